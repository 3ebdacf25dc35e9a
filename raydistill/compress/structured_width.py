"""Width pruning of Llama-style transformers decoder LMs to exact counts: embedding channels (the hidden
size), attention heads and KV heads, MLP intermediate units.

**Layout** (:func:`check_width_layout`): ``model_type`` llama / mistral / qwen2; every decoder layer holds
exactly ``self_attn`` (q/k/v/o projections), ``mlp`` (gate/up/down projections), ``input_layernorm`` and
``post_attention_layernorm`` (RMSNorm); the base model has ``embed_tokens`` and a final ``norm``.

**Activation importance** (Minitron, Muralidharan et al. 2024), from one eval forward over the
calibration blocks (pad positions left out), every statistic a mean over tokens:

* embedding channel ``c``: ``sum over the RMSNorms of mean |norm output[c]|`` -- the two norms of every
  kept layer and the final norm (the norms of layers being removed are left out: their readers go);
* attention head: ``sqrt(mean of its squared outputs)`` at ``o_proj``'s input (a KV group: the sum over
  its query heads before the root); MLP unit: ``sqrt(mean of its product act(g)*u squared)`` at
  ``down_proj``'s input;
* ``"random"``: seeded random scores.

**Channel removal** (:func:`prune_hidden`): the kept channels' columns of ``embed_tokens`` and of every
reader of the residual stream (q/k/v, gate/up, ``lm_head``; tied or not), rows (and biases) of every writer
(``o_proj``, ``down_proj``), entries of every norm weight; ``hidden_size`` in the config and on the modules
that carry it. ``head_dim`` is written explicitly into the config (Llama derives ``hidden_size //
num_attention_heads`` when it is absent): the attention keeps its heads and head size, only its input
and output width change. The pruned model equals the original in which (1) the removed channels are
zeroed in every writer into the residual stream (embedding columns, ``o_proj`` / ``down_proj`` rows and
biases), so the residual stream is exactly zero on them, and (2) every RMSNorm takes its mean square over
the kept channels only -- equivalently, its ``eps`` is multiplied by ``K/H`` and its weight by
``sqrt(K/H)`` (``K`` kept of ``H`` channels), because ``x / sqrt(S/K + eps) = sqrt(K/H) x / sqrt(S/H +
eps K/H)`` for the sum of squares ``S`` of a stream that is zero off the kept channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydistill.compress.structured import (_apply_gated, _apply_heads, _heads, _is_attention, _is_gated,
                                            _set_config_heads, _set_config_intermediate, _shrink_linear, _top)
from raydistill.compress.structured_lm import CalibrationState, calibration_pass, decoder_layers, model_configs

__all__ = ["WIDTH_RANKINGS", "check_width_layout", "activation_stats", "channel_scores", "select_heads",
           "prune_heads", "prune_mlp", "prune_hidden"]

WIDTH_RANKINGS = ("activation", "random")
_CHILDREN = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def _is_rmsnorm(m: nn.Module, h: int) -> bool:
    w = getattr(m, "weight", None)
    return type(m).__name__.endswith("RMSNorm") and isinstance(w, Tensor) and tuple(w.shape) == (h,) \
        and getattr(m, "bias", None) is None


def final_norm(base: nn.Module) -> nn.Module:
    return base.base_model.norm


def layer_norms(layer: nn.Module) -> list[nn.Module]:
    return [layer.input_layernorm, layer.post_attention_layernorm]


def check_width_layout(base: nn.Module) -> None:
    """ValueError naming the first part of the (unwrapped) model that is not the Llama-style layout."""
    h = int(base.config.hidden_size)
    _, attr, layers = decoder_layers(base)
    emb = base.get_input_embeddings()
    if not isinstance(emb, nn.Embedding) or emb.weight.shape[1] != h:
        raise ValueError(f"model: width pruning needs an nn.Embedding of {h} channels, got {type(emb).__name__}")
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or head.in_features != h:
        raise ValueError(f"model: width pruning needs lm_head to be a float nn.Linear reading {h} channels, got "
                         f"{type(head).__name__}")
    if not _is_rmsnorm(getattr(base.base_model, "norm", None) or nn.Module(), h):
        raise ValueError("model: width pruning needs the final norm (model.norm) to be an RMSNorm of hidden_size")
    for i, layer in enumerate(layers):
        extra = [n for n, c in layer.named_children() if n not in _CHILDREN and any(True for _ in c.parameters())]
        missing = [n for n in _CHILDREN if not hasattr(layer, n)]
        if extra or missing:
            raise ValueError(f"model: decoder layer {attr}.{i} has {'unknown parts ' + str(extra) if extra else ''}"
                             f"{' and ' if extra and missing else ''}{'no ' + str(missing) if missing else ''}; "
                             f"width pruning knows layers of exactly {list(_CHILDREN)}")
        if not _is_attention(layer.self_attn) or not _is_gated(layer.mlp) or \
                not all(_is_rmsnorm(n, h) for n in layer_norms(layer)):
            raise ValueError(f"model: decoder layer {attr}.{i} is not Llama-style (q/k/v/o attention, "
                             "gate/up/down MLP, RMSNorms of hidden_size)")
        lin = [getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
            [getattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")]
        bad = [type(x).__name__ for x in lin if type(x) is not nn.Linear]
        if bad:
            raise ValueError(f"model: decoder layer {attr}.{i} has {bad[0]} projections; width pruning needs float "
                             "nn.Linear (prune before the prune / quantize steps)")


@torch.no_grad()
def activation_stats(base: nn.Module, calibration: Tensor, kept_layers: list[int], *, channels: bool, heads: bool,
                     mlp: bool, pad_id: int | None = None, batch_size: int = 8) -> dict:
    """One eval forward: {"channels": (H,) summed mean |norm output| over the kept layers' norms and the
    final norm, "o_proj": {layer: (q heads * head_dim,) mean squared input}, "down_proj": {layer: (I,)
    mean squared input}} (only the parts asked for)."""
    _, _, layers = decoder_layers(base)
    state = CalibrationState()
    sums: dict[tuple, Tensor] = {}
    rows: dict[tuple, int] = {}

    def add(key, x, fn):
        r = state.rows(x).double()
        sums[key] = sums.get(key, 0) + fn(r).sum(0)
        rows[key] = rows.get(key, 0) + r.shape[0]

    hooks = []
    for i in kept_layers:
        layer = layers[i]
        if channels:
            for k, norm in enumerate(layer_norms(layer)):
                hooks.append(norm.register_forward_hook(
                    lambda _m, _a, out, key=("norm", i, k): add(key, out, torch.abs)))
        if heads:
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda _m, a, key=("o_proj", i): add(key, a[0], torch.square)))
        if mlp:
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda _m, a, key=("down_proj", i): add(key, a[0], torch.square)))
    if channels:
        hooks.append(final_norm(base).register_forward_hook(lambda _m, _a, out: add(("norm", "final"), out, torch.abs)))
    try:
        calibration_pass(base, calibration, state, pad_id=pad_id, batch_size=batch_size)
    finally:
        for h in hooks:
            h.remove()
    if any(n == 0 for n in rows.values()):
        raise ValueError("calibration has no token that is not pad_id")
    mean = {k: (s / rows[k]).cpu() for k, s in sums.items()}
    out: dict = {}
    if channels:
        out["channels"] = sum(v for k, v in mean.items() if k[0] == "norm")
    if heads:
        out["o_proj"] = {k[1]: v for k, v in mean.items() if k[0] == "o_proj"}
    if mlp:
        out["down_proj"] = {k[1]: v for k, v in mean.items() if k[0] == "down_proj"}
    return out


def random_scores(n: int, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64)


def select_heads(per_q: Tensor, kv_keep: int, q_per_group: int) -> tuple[Tensor, Tensor]:
    """(kept query heads, kept KV heads), sorted, from per-query-head scores ``per_q`` (KV, G) (squared
    output norms, or any nonnegative score): the ``kv_keep`` KV groups of largest summed score, then in each
    kept group its ``q_per_group`` highest-scored query heads."""
    kv, g = per_q.shape
    groups = _top(per_q.sum(1), kv_keep)
    q = torch.cat([grp * g + _top(per_q[grp], q_per_group) for grp in groups.tolist()])
    return q, groups


@torch.no_grad()
def prune_heads(attns: list[nn.Module], kept: list[tuple[Tensor, Tensor]], base: nn.Module) -> None:
    """Keep the given (query heads, KV heads) of each attention module; config gets the new counts."""
    for attn, (q, kv) in zip(attns, kept):
        _apply_heads(attn, q, kv)
    _set_config_heads(base, attns)


@torch.no_grad()
def prune_mlp(mlps: list[nn.Module], kept: list[Tensor], base: nn.Module) -> None:
    """Keep the given intermediate units of each gated MLP; config gets the new intermediate_size."""
    for mlp, k in zip(mlps, kept):
        _apply_gated(mlp, k)
    _set_config_intermediate(base, mlps)


def _shrink_norm(norm: nn.Module, keep: Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight.detach()[keep.to(norm.weight.device)].clone(),
                               requires_grad=norm.weight.requires_grad)
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (int(keep.numel()),)


@torch.no_grad()
def prune_hidden(base: nn.Module, keep: Tensor) -> None:
    """Keep embedding channels ``keep`` (sorted indices) of the (unwrapped, checked) model in place."""
    h = int(base.config.hidden_size)
    k = int(keep.numel())
    _, _, layers = decoder_layers(base)
    hd = _heads(layers[0].self_attn)[2]
    emb = base.get_input_embeddings()
    head = base.get_output_embeddings()
    tied = head.weight is emb.weight
    dev = emb.weight.device
    new_emb = nn.Embedding(emb.num_embeddings, k, emb.padding_idx, device=dev, dtype=emb.weight.dtype)
    new_emb.weight.copy_(emb.weight[:, keep.to(dev)])
    new_emb.train(emb.training)
    base.set_input_embeddings(new_emb)
    if tied:
        new_head = nn.Linear(k, head.out_features, head.bias is not None, device=dev, dtype=head.weight.dtype)
        new_head.weight = new_emb.weight
        if head.bias is not None:
            new_head.bias.copy_(head.bias)
        new_head.train(head.training)
    else:
        new_head = _shrink_linear(head, None, keep)
    base.set_output_embeddings(new_head)
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for p in ("q_proj", "k_proj", "v_proj"):
            setattr(a, p, _shrink_linear(getattr(a, p), None, keep))
        a.o_proj = _shrink_linear(a.o_proj, keep, None)
        for p in ("gate_proj", "up_proj"):
            setattr(m, p, _shrink_linear(getattr(m, p), None, keep))
        m.down_proj = _shrink_linear(m.down_proj, keep, None)
        for norm in layer_norms(layer):
            _shrink_norm(norm, keep)
    _shrink_norm(final_norm(base), keep)
    for mod in base.modules():
        if getattr(mod, "hidden_size", None) == h and not isinstance(getattr(mod, "hidden_size"), bool):
            mod.hidden_size = k
    for c in model_configs(base):
        c.hidden_size = k
        c.head_dim = hd
