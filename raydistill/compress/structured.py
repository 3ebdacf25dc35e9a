"""Structured pruning: remove whole hidden units of MLPs and whole attention heads, giving a smaller
dense model.

**MLP units.** A *unit pair* is two nn.Linear layers ``a -> f -> b`` that follow each other in an
``nn.Sequential`` with only elementwise activations ``f`` between them whose ``f(0) = 0`` (ReLU, GELU,
SiLU, Tanh, LeakyReLU, ELU, Dropout, Identity). Removing hidden unit ``k`` drops row ``k`` of ``a`` (and its
bias) and column ``k`` of ``b``; a unit whose output is always zero contributes nothing, so removing it
keeps the function exactly. The model's outputs (the last Linear's rows) are never removed.

**Gated MLPs** (transformers Llama-style MLP: a module with ``gate_proj``, ``up_proj``, ``down_proj``
Linear layers computing ``down_proj(act(gate_proj(x)) * up_proj(x))``; Llama, Mistral, Qwen2, ...).
Removing intermediate unit ``k`` drops row ``k`` of ``gate_proj`` and of ``up_proj`` (and their biases)
and column ``k`` of ``down_proj``: the model equals the original with that unit's product
``act(g_k) * u_k`` zeroed at ``down_proj``'s input, whatever the activation. The config holds one
``intermediate_size``, so the same number of units goes in every gated MLP (each picks its own) and
``include``/``exclude`` must select all of them or none; the config gets the new ``intermediate_size``.

**Attention heads** (transformers Llama-style attention: a module with ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj`` Linear layers and ``head_dim``; Llama, Mistral, Qwen2, ...). Removing a head drops
its ``head_dim`` rows of ``q_proj`` and the matching input columns of ``o_proj``: the model equals the
original with that head's output zeroed. With grouped KV heads (``num_key_value_heads <
num_attention_heads``) the unit is chosen by ``head_unit``:

* ``"kv_group"`` (default): a KV head together with the query heads that read it (its k/v rows go too);
  with plain multi-head attention that is one head;
* ``"query"``: query heads only, the same number in every KV group (k/v unchanged).

A transformers config holds one head count for all layers, so the same number of units is removed in
every layer (each layer picks its own), and ``include``/``exclude`` must select all of a model's
attention modules or none. The config gets the new ``num_attention_heads`` / ``num_key_value_heads``
and an explicit ``head_dim``, so ``save_pretrained`` / ``from_pretrained`` rebuild the pruned model.
GPT-2 style attention (fused ``c_attn``) is refused (a ValueError naming the module, unless excluded):
transformers' GPT-2 derives ``head_dim = n_embd // n_head`` and builds ``c_attn`` / ``c_proj`` ``n_embd``
wide, and GPT2Config has no ``head_dim`` key, so fewer heads cannot be represented without changing
``n_embd`` (the residual width).

Ranking (``calibration=None``): the L2 norm of the weights the unit owns (MLP: row ``k`` of ``a`` with its
bias; gated MLP: row ``k`` of ``gate_proj`` and ``up_proj`` with biases and column ``k`` of ``down_proj``;
head: its ``q_proj`` rows, ``o_proj`` columns, and for a KV group its ``k_proj``/``v_proj`` rows).
With a calibration batch (the Minitron recipe, Muralidharan et al. 2024): activation importance,
``sqrt(mean over rows (tokens) of the unit's output squared)``, the output read at the input of ``b`` /
``down_proj`` / ``o_proj`` (a head: the squared norm of its ``head_dim`` outputs) in one forward pass.

**Decoder layers and embedding channels** of transformers decoder LMs (``num_layers`` / ``hidden_size``):
:mod:`raydistill.compress.structured_depth`, :mod:`raydistill.compress.structured_width`; pruning to a
whole target shape: :func:`raydistill.compress.prune_shape.prune_to_shape`.

Public API (``raydistill.compress.prune_structured``, in :mod:`raydistill.compress.prune_shape`, adds
``num_layers`` / ``hidden_size`` / ``depth_ranking`` / ``contiguous`` to ``prune_units``)::

    prune_units(model, ratio=0.5, calibration=None, include=None, exclude=None,
                head_unit="kv_group") -> StructuredReport
    resize_structured(model, widths)   # shapes only (to load a pruned checkpoint into a fresh model)
    unit_pairs(model) -> list[(name_a, name_b)]
    gated_mlps(model) -> list[name]
    attention_modules(model) -> list[name]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["prune_units", "resize_structured", "unit_pairs", "gated_mlps", "attention_modules",
           "StructuredReport"]

_ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Dropout, nn.Identity,
                    nn.Hardtanh, nn.Mish)
HEAD_UNITS = ("kv_group", "query")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED = ("gate_proj", "up_proj", "down_proj")


@dataclass
class StructuredReport:
    """What prune_structured changed: per layer the units before/after; whole-model params and bytes."""

    ratio: float
    ranking: str
    layers: list[dict] = field(default_factory=list)  # {name, kind, units_before, units_after, ...}
    widths: dict[str, int] = field(default_factory=dict)  # {layer: out_features after}
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    def to_dict(self) -> dict:
        return asdict(self) | {"compression_ratio": self.compression_ratio}


def _linear_like(m: nn.Module) -> bool:
    """nn.Linear, or a layer standing in for one (QuantizedLinear, SparseLinear, ...)."""
    return isinstance(m, nn.Linear) or (isinstance(getattr(m, "in_features", None), int)
                                        and isinstance(getattr(m, "out_features", None), int))


def unit_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(a, b) names of consecutive nn.Linear layers in an nn.Sequential joined by zero-preserving
    elementwise modules only."""
    from raydistill.compress.pruner import normalize_name
    from raydistill.utils import unwrap_model

    base = unwrap_model(model)
    pairs = []
    for pname, mod in base.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        prev = None
        for cname, child in mod.named_children():
            full = normalize_name(f"{pname}.{cname}" if pname else cname)
            if _linear_like(child):
                if prev is not None:
                    pairs.append((prev, full))
                prev = full
            elif not isinstance(child, _ZERO_PRESERVING):
                prev = None
    return pairs


def _is_gated(m: nn.Module) -> bool:
    return all(_linear_like(getattr(m, p, None) or nn.Module()) for p in _GATED)


def gated_mlps(model: nn.Module) -> list[str]:
    """Names of the Llama-style gated MLP modules (``gate_proj``, ``up_proj``, ``down_proj``)."""
    from raydistill.compress.pruner import normalize_name
    from raydistill.utils import unwrap_model

    return [normalize_name(n) for n, m in unwrap_model(model).named_modules() if _is_gated(m)]


def _is_attention(m: nn.Module) -> bool:
    return all(_linear_like(getattr(m, p, None) or nn.Module()) for p in _PROJ) \
        and isinstance(getattr(m, "head_dim", None), int)


def _is_fused_attention(m: nn.Module) -> bool:
    """GPT-2 style attention: one fused ``c_attn`` projection for q, k and v, and ``c_proj``."""
    return hasattr(m, "c_attn") and hasattr(m, "c_proj") and isinstance(getattr(m, "num_heads", None), int)


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the Llama-style attention modules (q/k/v/o projections and ``head_dim``)."""
    from raydistill.compress.pruner import normalize_name
    from raydistill.utils import unwrap_model

    return [normalize_name(n) for n, m in unwrap_model(model).named_modules() if _is_attention(m)]


def _heads(attn: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) from the projection shapes."""
    hd = attn.head_dim
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd, hd


def _params_bytes(model: nn.Module) -> tuple[int, int]:
    ps = list(model.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() * p.element_size() for p in ps)


def _check_float_linear(name: str, mod: nn.Module) -> None:
    if type(mod) is not nn.Linear:
        raise ValueError(f"prune_structured: layer {name!r} is a {type(mod).__name__}, not a float nn.Linear; "
                         "prune_structured must run before prune (SparseLinear) and quantize steps")


@torch.no_grad()
def _input_energy(model: nn.Module, targets: dict[str, nn.Module], calibration: Tensor) -> dict[str, Tensor]:
    """{key: mean over rows (every leading index: samples, tokens) of the squared input of targets[key]},
    a vector over its input columns, from one eval forward of ``calibration``."""
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []
    for key, mod in targets.items():
        def hook(_mod, inp, key=key):
            x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            rows[key] = rows.get(key, 0) + x.shape[0]
        hooks.append(mod.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        model(calibration)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return {k: (s / max(1, rows[k])).cpu() for k, s in sums.items()}


def _shrink_linear(old: nn.Linear, rows: Tensor | None, cols: Tensor | None) -> nn.Linear:
    """A new nn.Linear holding rows ``rows`` and columns ``cols`` (None: all) of ``old``."""
    w = old.weight
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    new = nn.Linear(w.shape[1], w.shape[0], old.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if old.bias is not None:
        new.bias.copy_(old.bias if rows is None else old.bias[rows.to(w.device)])
    new.train(old.training)
    return new


def _apply(base: nn.Module, layers: dict[str, nn.Module], keep: dict[str, Tensor], pairs) -> None:
    from raydistill.compress.convert import _set_submodule

    col_keep = {b: keep[a] for a, b in pairs if a in keep}
    for name in dict.fromkeys([n for p in pairs for n in p]):
        _set_submodule(base, name, _shrink_linear(layers[name], keep.get(name), col_keep.get(name)))


def _head_rows(heads: Tensor, hd: int) -> Tensor:
    """Row indices of the given heads in a projection of ``head_dim`` rows per head."""
    return (heads[:, None] * hd + torch.arange(hd)).reshape(-1)


def _apply_heads(attn: nn.Module, q_heads: Tensor, kv_heads: Tensor | None) -> None:
    """Keep query heads ``q_heads`` (sorted) and KV heads ``kv_heads`` (None: all) of ``attn``."""
    h, kv, hd = _heads(attn)
    q_rows = _head_rows(q_heads, hd)
    attn.q_proj = _shrink_linear(attn.q_proj, q_rows, None)
    attn.o_proj = _shrink_linear(attn.o_proj, None, q_rows)
    if kv_heads is not None:
        kv_rows = _head_rows(kv_heads, hd)
        attn.k_proj = _shrink_linear(attn.k_proj, kv_rows, None)
        attn.v_proj = _shrink_linear(attn.v_proj, kv_rows, None)
    h2, kv2, _ = _heads(attn)
    attn.num_key_value_groups = h2 // kv2
    for attr, val in (("num_heads", h2), ("num_attention_heads", h2), ("num_key_value_heads", kv2)):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, val)


def _set_config_heads(base: nn.Module, attns: list[nn.Module]) -> None:
    """Write the (uniform) new head counts and an explicit head_dim into the configs of the model and of
    its attention modules."""
    h, kv, hd = _heads(attns[0])
    configs = {id(c): c for c in [getattr(base, "config", None), *(getattr(a, "config", None) for a in attns)]
               if c is not None}
    for c in configs.values():
        c.num_attention_heads = h
        c.num_key_value_heads = kv
        c.head_dim = hd


def _apply_gated(mlp: nn.Module, keep: Tensor) -> None:
    """Keep intermediate units ``keep`` (sorted) of the gated MLP ``mlp``."""
    mlp.gate_proj = _shrink_linear(mlp.gate_proj, keep, None)
    mlp.up_proj = _shrink_linear(mlp.up_proj, keep, None)
    mlp.down_proj = _shrink_linear(mlp.down_proj, None, keep)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = int(keep.numel())


def _set_config_intermediate(base: nn.Module, mlps: list[nn.Module]) -> None:
    """Write the (uniform) new intermediate size into the configs of the model and of its MLP modules."""
    n = mlps[0].gate_proj.out_features
    for c in {id(c): c for c in [getattr(base, "config", None), *(getattr(m, "config", None) for m in mlps)]
              if c is not None}.values():
        c.intermediate_size = n


def _check_gated(base: nn.Module, layers: dict, all_mlp: list[str], mlps: list[str], ratio: float, include,
                 exclude) -> None:
    if mlps and len(mlps) != len(all_mlp):
        raise ValueError(f"prune_structured: include={include!r} exclude={exclude!r} select {len(mlps)} of the "
                         f"model's {len(all_mlp)} gated MLP modules (gate_proj/up_proj/down_proj); select all of "
                         "them or none (the model config holds one intermediate_size for every layer)")
    for m in mlps:
        for p in _GATED:
            _check_float_linear(f"{m}.{p}", getattr(layers[m], p))
        g, u, d = (getattr(layers[m], p) for p in _GATED)
        if not g.out_features == u.out_features == d.in_features:
            raise ValueError(f"prune_structured: gated MLP {m!r} has gate_proj/up_proj out_features "
                             f"{g.out_features}/{u.out_features} and down_proj in_features {d.in_features}; "
                             "they must be equal")
    sizes = {layers[m].gate_proj.out_features for m in mlps}
    if len(sizes) > 1:
        raise ValueError(f"prune_structured: the gated MLP modules have different intermediate sizes "
                         f"{sorted(sizes)}; pruning them needs one size per model")
    conf = getattr(base, "config", None)
    if mlps and conf is not None:
        size = conf.to_dict().get("intermediate_size")
        if size != next(iter(sizes)):
            raise ValueError(f"prune_structured: the gated MLP modules have {next(iter(sizes))} intermediate "
                             f"units but the {type(conf).__name__}'s intermediate_size is {size!r}, so the "
                             "pruned size cannot be saved; exclude the MLP modules")
    for m in mlps:
        n = layers[m].gate_proj.out_features
        if n - round(ratio * n) < 1:
            raise ValueError(f"prune_structured: ratio {ratio} would remove every unit of gated MLP {m!r} "
                             f"({n} intermediate units); use a smaller ratio")


def _gated_scores(mlp: nn.Module, energy: Tensor | None) -> Tensor:
    """Importance per intermediate unit (the activation at down_proj's input, or the weight norm)."""
    if energy is not None:
        return energy.sqrt()

    def rows_sq(lin):
        w = lin.weight.double().pow(2).sum(1)
        return w if lin.bias is None else w + lin.bias.double().pow(2)
    return (rows_sq(mlp.gate_proj) + rows_sq(mlp.up_proj) + mlp.down_proj.weight.double().pow(2).sum(0)).sqrt().cpu()


def _select(names, inc, exc):
    import fnmatch

    return [n for n in names if (inc is None or any(fnmatch.fnmatchcase(n, p) for p in inc))
            and not any(fnmatch.fnmatchcase(n, p) for p in exc)]


def _check_attention(base: nn.Module, layers: dict, all_attn: list[str], attn: list[str], ratio: float,
                     head_unit: str, include, exclude) -> None:
    if attn and len(attn) != len(all_attn):
        raise ValueError(f"prune_structured: include={include!r} exclude={exclude!r} select {len(attn)} of the "
                         f"model's {len(all_attn)} attention modules; select all of them or none (the model "
                         "config holds one head count for every layer)")
    counts = {_heads(layers[a])[:2] for a in attn}
    if len(counts) > 1:
        raise ValueError(f"prune_structured: the attention modules have different head counts {sorted(counts)}; "
                         "pruning heads needs one count per model")
    conf = getattr(base, "config", None)
    if attn and conf is not None and "head_dim" not in conf.to_dict():
        raise ValueError(f"prune_structured: the {type(conf).__name__} has no head_dim key, so a model with "
                         "fewer heads cannot be saved; exclude its attention modules")
    for a in attn:
        for p in _PROJ:
            _check_float_linear(f"{a}.{p}", getattr(layers[a], p))
        h, kv, _ = _heads(layers[a])
        if h % kv:
            raise ValueError(f"prune_structured: {a!r} has {h} query heads, not a multiple of its {kv} KV heads")
        n = kv if head_unit == "kv_group" else h // kv
        what = "KV groups (a KV head and its query heads)" if head_unit == "kv_group" else "query heads per KV group"
        if n - round(ratio * n) < 1:
            hint = "; head_unit='query' removes query heads only" if head_unit == "kv_group" and kv < h else ""
            raise ValueError(f"prune_structured: ratio {ratio} would remove every head of attention module "
                             f"{a!r} ({n} {what}){hint}; use a smaller ratio")


def _head_scores(attn: nn.Module, energy: Tensor | None, head_unit: str) -> Tensor:
    """Importance per unit: (KV,) for kv_group, (KV, G) for query."""
    h, kv, hd = _heads(attn)
    if energy is not None:  # activation: squared output norm per query head, mean over tokens
        per_q = energy.reshape(h, hd).sum(1)
    else:
        def rows_sq(lin):
            w = lin.weight.double().reshape(-1, hd, lin.in_features).pow(2).sum((1, 2))
            return w if lin.bias is None else w + lin.bias.double().reshape(-1, hd).pow(2).sum(1)
        per_q = rows_sq(attn.q_proj) + attn.o_proj.weight.double().pow(2).reshape(-1, h, hd).sum((0, 2))
    per_q = per_q.cpu().reshape(kv, h // kv)
    if head_unit == "query":
        return per_q.sqrt()
    per_group = per_q.sum(1)
    if energy is None:
        per_group = per_group + rows_sq(attn.k_proj).cpu() + rows_sq(attn.v_proj).cpu()
    return per_group.sqrt()


def _top(scores: Tensor, k: int) -> Tensor:
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


@torch.no_grad()
def _check_calibration(model: nn.Module, calibration: Tensor) -> None:
    """``calibration`` must be a batch the model runs on: token ids ``(batch, seq)`` in ``[0, vocab)`` for a
    model with an input embedding (a causal LM), else floats of the model's dtype whose forward works (tried
    on the first row). ValueError naming ``calibration`` and what is expected (not a raw matmul error)."""
    params = next(model.parameters(), None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, nn.Embedding):
        want = f"token ids: an integer tensor of shape (batch, seq) with values in [0, {emb.num_embeddings})"
        if calibration.is_floating_point() or calibration.is_complex() or calibration.dtype == torch.bool:
            raise ValueError(f"calibration must be {want}, got dtype {calibration.dtype}")
        if calibration.dim() != 2:
            raise ValueError(f"calibration must be {want}, got shape {tuple(calibration.shape)}")
        lo, hi = int(calibration.min()), int(calibration.max())
        if lo < 0 or hi >= emb.num_embeddings:
            raise ValueError(f"calibration must be {want}, got values in [{lo}, {hi}]")
    else:
        dtype = params.dtype if params is not None else torch.float32
        first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
        shape = f"(batch, {first.in_features})" if isinstance(first, nn.Linear) else "(batch, ...)"
        want = f"a batch of model inputs: {str(dtype).removeprefix('torch.')} of shape {shape} as the model's forward takes"
        if calibration.dtype != dtype:
            raise ValueError(f"calibration must be {want}, got dtype {calibration.dtype}")
    was = model.training
    model.eval()
    try:  # one row through the model: a wrong input shape is named here, not deep inside a layer
        model(calibration[:1].to(params.device if params is not None else calibration.device))
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:
        raise ValueError(f"calibration must be {want}; the model cannot run on a {calibration.dtype} tensor of "
                         f"shape {tuple(calibration.shape)} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    finally:
        model.train(was)


@torch.no_grad()
def prune_units(model: nn.Module, ratio: float = 0.5, calibration: Tensor | None = None, *, include=None,
                exclude=None, head_unit: str = "kv_group") -> StructuredReport:
    """Remove ``round(ratio * units)`` hidden units of every selected unit pair's first layer and of every
    gated MLP, and ``round(ratio * units)`` attention units (``head_unit``) of every attention module, in
    place (the layers are replaced by smaller nn.Linear). ``include``/``exclude`` are fnmatch patterns on
    the first layer's name / the gated MLP module's / the attention module's name. ``calibration``: a batch of model inputs for
    activation ranking (None: weight norm). Returns a :class:`StructuredReport` (``widths`` rebuilds the
    shapes: :func:`resize_structured`). The width part of :func:`raydistill.compress.prune_structured`
    (which also removes decoder layers and embedding channels: :mod:`raydistill.compress.prune_shape`)."""
    from raydistill.compress.pruner import _patterns, normalize_name
    from raydistill.utils import unwrap_model

    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be a float in [0, 1) (the fraction of hidden units removed), got {ratio!r}")
    if calibration is not None and (not isinstance(calibration, Tensor) or calibration.numel() == 0):
        raise ValueError("calibration must be a non-empty Tensor batch of model inputs, or None")
    if calibration is not None:
        _check_calibration(unwrap_model(model), calibration)
    if head_unit not in HEAD_UNITS:
        raise ValueError(f"head_unit must be one of {HEAD_UNITS}, got {head_unit!r}")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude") or []
    base = unwrap_model(model)
    layers = {normalize_name(n): m for n, m in base.named_modules()}
    pairs = [(a, b) for a, b in unit_pairs(base) if _select([a], inc, exc)]
    all_attn = attention_modules(base)
    attn = _select(all_attn, inc, exc)
    all_mlp = gated_mlps(base)
    mlps = _select(all_mlp, inc, exc)
    gpt2 = _select([normalize_name(n) for n, m in base.named_modules() if _is_fused_attention(m)], inc, exc)
    if gpt2:
        raise ValueError(f"prune_structured: attention module {gpt2[0]!r} is GPT-2 style (a fused c_attn): fewer "
                         "heads cannot be represented, because transformers' GPT-2 derives head_dim = n_embd // "
                         "n_head and makes c_attn 3 * n_embd and c_proj n_embd wide (GPT2Config has no head_dim), "
                         "so removing heads would change n_embd, the residual width; exclude it "
                         f"(exclude=['*.attn']) or use a Llama-style student (q/k/v/o projections)")
    if not pairs and not attn and not mlps:
        raise ValueError(f"prune_structured: no Linear -> activation -> Linear pair, no gated MLP and no q/k/v/o "
                         f"attention module in the model matches include={include!r} exclude={exclude!r}")
    for a, b in pairs:
        _check_float_linear(a, layers[a])
        _check_float_linear(b, layers[b])
    ratio = float(ratio)
    for a, _ in pairs:
        n = layers[a].out_features
        if n - round(ratio * n) < 1:
            raise ValueError(f"prune_structured: ratio {ratio} would remove every unit of layer {a!r} "
                             f"({n} units); use a smaller ratio")
    _check_gated(base, layers, all_mlp, mlps, ratio, include, exclude)
    _check_attention(base, layers, all_attn, attn, ratio, head_unit, include, exclude)
    params_b, bytes_b = _params_bytes(base)
    energy: dict[str, Tensor] = {}
    if calibration is not None:
        dev = next(base.parameters()).device
        targets = {a: layers[b] for a, b in pairs} | {a: layers[a].o_proj for a in attn} \
            | {m: layers[m].down_proj for m in mlps}
        energy = _input_energy(base, targets, calibration.to(dev))
    rep = StructuredReport(ratio=ratio, ranking="activation" if calibration is not None else "weight_norm")
    keep: dict[str, Tensor] = {}
    for a, _ in pairs:
        n = layers[a].out_features
        k = n - round(ratio * n)
        if calibration is not None:
            scores = energy[a].sqrt()
        else:
            w = layers[a].weight.float()
            scores = (torch.cat([w, layers[a].bias.float()[:, None]], 1) if layers[a].bias is not None else w).norm(dim=1)
        keep[a] = _top(scores.cpu(), k)
        rep.layers.append({"name": a, "kind": "mlp", "units_before": n, "units_after": k})
        rep.widths[a] = k
    _apply(base, layers, keep, pairs)
    for m in mlps:
        mod = layers[m]
        n = mod.gate_proj.out_features
        kept = _top(_gated_scores(mod, energy.get(m)), n - round(ratio * n))
        _apply_gated(mod, kept)
        rep.layers.append({"name": m, "kind": "gated_mlp", "units_before": n, "units_after": int(kept.numel()),
                           "kept_units": kept.tolist()})
        rep.widths[f"{m}.gate_proj"] = int(kept.numel())
    if mlps:
        _set_config_intermediate(base, [layers[m] for m in mlps])
    for a in attn:
        mod = layers[a]
        h, kv, hd = _heads(mod)
        scores = _head_scores(mod, energy.get(a), head_unit)
        g = h // kv
        if head_unit == "kv_group":
            groups = _top(scores, kv - round(ratio * kv))
            q_heads = (groups[:, None] * g + torch.arange(g)).reshape(-1)
            _apply_heads(mod, q_heads, groups)
        else:
            per = g - round(ratio * g)
            q_heads = torch.cat([grp * g + _top(scores[grp], per) for grp in range(kv)])
            _apply_heads(mod, q_heads, None)
        h2, kv2, _ = _heads(mod)
        rep.layers.append({"name": a, "kind": "attention", "head_unit": head_unit, "units_before": h,
                           "units_after": h2, "kv_heads_before": kv, "kv_heads_after": kv2,
                           "kept_heads": q_heads.tolist()})
        rep.widths[f"{a}.q_proj"] = mod.q_proj.out_features
        rep.widths[f"{a}.k_proj"] = mod.k_proj.out_features
    if attn:
        _set_config_heads(base, [layers[a] for a in attn])
    rep.params_before, rep.bytes_before = params_b, bytes_b
    rep.params_after, rep.bytes_after = _params_bytes(base)
    return rep


@torch.no_grad()
def resize_structured(model: nn.Module, widths: dict[str, int]) -> nn.Module:
    """Give the unit pairs' first layers, the gated MLPs' ``gate_proj`` (with ``up_proj`` and
    ``down_proj``'s inputs), and the attention modules' ``q_proj`` / ``k_proj``, the given
    out_features (keeping their first units / heads) so that a state dict saved after
    :func:`prune_structured` loads into a freshly built model."""
    from raydistill.compress.pruner import normalize_name
    from raydistill.utils import unwrap_model

    base = unwrap_model(model)
    layers = {normalize_name(n): m for n, m in base.named_modules()}
    pairs = [(a, b) for a, b in unit_pairs(base) if a in widths]
    attn = [a for a in attention_modules(base) if f"{a}.q_proj" in widths or f"{a}.k_proj" in widths]
    mlps = [m for m in gated_mlps(base) if f"{m}.gate_proj" in widths]
    missing = set(widths) - {a for a, _ in pairs} - {f"{a}.{p}" for a in attn for p in ("q_proj", "k_proj")} \
        - {f"{m}.gate_proj" for m in mlps}
    if missing:
        raise ValueError(f"resize_structured: widths name layers that are not the first layer of a unit pair, "
                         f"a gated MLP's gate_proj nor an attention module's q_proj / k_proj: {sorted(missing)}")
    for m in mlps:
        w = int(widths[f"{m}.gate_proj"])
        if not 1 <= w <= layers[m].gate_proj.out_features:
            raise ValueError(f"resize_structured: width {w} for {m}.gate_proj must be in "
                             f"[1, {layers[m].gate_proj.out_features}]")
    keep = {}
    for a, _ in pairs:
        w = int(widths[a])
        if not 1 <= w <= layers[a].out_features:
            raise ValueError(f"resize_structured: width {w} for {a!r} must be in [1, {layers[a].out_features}]")
        keep[a] = torch.arange(w)
    for a in attn:
        mod = layers[a]
        h, kv, hd = _heads(mod)
        wq, wk = int(widths.get(f"{a}.q_proj", h * hd)), int(widths.get(f"{a}.k_proj", kv * hd))
        if wq % hd or wk % hd or not (1 <= wk // hd <= kv and 1 <= wq // hd <= h) or (wq // hd) % (wk // hd):
            raise ValueError(f"resize_structured: widths q_proj {wq} / k_proj {wk} for {a!r} must be whole heads "
                             f"of {hd} (at most {h} / {kv} heads; query heads a multiple of KV heads)")
    _apply(base, layers, keep, pairs)
    for m in mlps:
        _apply_gated(layers[m], torch.arange(int(widths[f"{m}.gate_proj"])))
    if mlps:
        _set_config_intermediate(base, [layers[m] for m in mlps])
    for a in attn:
        mod = layers[a]
        h, kv, hd = _heads(mod)
        wq, wk = int(widths.get(f"{a}.q_proj", h * hd)), int(widths.get(f"{a}.k_proj", kv * hd))
        _apply_heads(mod, torch.arange(wq // hd), torch.arange(wk // hd))
    if attn:
        _set_config_heads(base, [layers[a] for a in attn])
    return model
