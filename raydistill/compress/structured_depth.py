"""Depth pruning of transformers decoder LMs: remove whole decoder layers.

**Ranking** (``ranking``), on a calibration set of token blocks, of each candidate -- one layer
(``contiguous=False``) or each window of ``n`` consecutive layers (``contiguous=True``) -- lowest score
removed first:

* ``"block_importance"`` (Men et al. 2024, ShortGPT; Minitron): ``1 - cos(h_in, h_out)``, the mean over
  (non-pad) tokens of one minus the cosine similarity between the hidden state entering the layer (window)
  and the one leaving it: a layer that barely turns the residual stream matters little;
* ``"perplexity"`` (Minitron's LM-loss ranking): the increase of the calibration set's mean next-token
  loss (log perplexity) when the layer (window) alone is skipped (its output replaced by its input);
* ``"random"``: a seeded random score (the baseline the rankings are measured against).

Individual selection removes the ``n`` lowest-scored layers; contiguous selection removes the lowest-scored
window of ``n`` layers (window scores are measured on the window, not summed from single layers).

**Removal** (:func:`drop_layers`): the decoder ``nn.ModuleList`` keeps the other layers in order; every
``layer_idx`` attribute inside a kept layer (attention modules: the KV-cache slot) becomes its new
position; the config gets ``num_hidden_layers`` and the per-layer lists (``layer_types``) of the kept
layers, so ``save_pretrained`` / ``from_pretrained`` rebuild the model. The pruned model equals the
original with the removed layers skipped (their output replaced by their input). GPT-2 with
``scale_attn_by_inverse_layer_idx`` is refused: its attention scale depends on the layer's position, so
renumbering would change what the kept layers compute.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydistill.compress.structured_lm import (DEPTH_MODEL_TYPES, PER_LAYER_CONFIG_KEYS, CalibrationState,
                                               calibration_pass, decoder_layers, lm_nll, model_configs)

__all__ = ["DEPTH_RANKINGS", "layer_scores", "select_layers", "drop_layers", "skip_layers"]

DEPTH_RANKINGS = ("block_importance", "perplexity", "random")


def _hidden_in(args, kwargs) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def windows(num_layers: int, n: int, contiguous: bool) -> list[tuple[int, ...]]:
    """The candidates: each layer alone, or each window of ``n`` consecutive layers."""
    if not contiguous:
        return [(i,) for i in range(num_layers)]
    return [tuple(range(s, s + n)) for s in range(num_layers - n + 1)]


def skip_layers(layers: nn.ModuleList, skip) -> list:
    """Forward hooks making each layer in ``skip`` return its input hidden states unchanged (the layer
    still runs); remove the returned handles to undo."""
    def hook(_m, args, kwargs, out):
        h = _hidden_in(args, kwargs)
        return (h, *out[1:]) if isinstance(out, tuple) else h
    return [layers[i].register_forward_hook(hook, with_kwargs=True) for i in skip]


def _block_importance(base, layers: nn.ModuleList, cands, calibration, pad_id, batch_size) -> list[float]:
    """Per candidate window: mean over valid tokens of 1 - cos(input of its first layer, output of its last)."""
    state = CalibrationState()
    ins: dict[int, Tensor] = {}
    outs: dict[int, Tensor] = {}
    firsts, lasts = {c[0] for c in cands}, {c[-1] for c in cands}
    sums = [0.0] * len(cands)
    count = [0]

    def make(i):
        def hook(_m, args, kwargs, out):
            if i in firsts:
                ins[i] = state.rows(_hidden_in(args, kwargs)).double()
            if i in lasts:
                outs[i] = state.rows(_hidden_out(out)).double()
        return hook

    hooks = [layers[i].register_forward_hook(make(i), with_kwargs=True) for i in range(len(layers))]

    def chunk_done():
        for k, c in enumerate(cands):
            sums[k] += float((1 - torch.nn.functional.cosine_similarity(ins[c[0]], outs[c[-1]], dim=-1)).sum())
        count[0] += ins[cands[0][0]].shape[0]
        ins.clear()
        outs.clear()

    # one chunk at a time so that only one chunk's hidden states are held
    try:
        for i in range(0, calibration.shape[0], batch_size):
            calibration_pass(base, calibration[i:i + batch_size], state, pad_id=pad_id, batch_size=batch_size)
            chunk_done()
    finally:
        for h in hooks:
            h.remove()
    if count[0] == 0:
        raise ValueError("calibration has no token that is not pad_id")
    return [s / count[0] for s in sums]


def _perplexity_increase(base, layers: nn.ModuleList, cands, calibration, pad_id, batch_size) -> tuple[list[float], float]:
    full = lm_nll(base, calibration, pad_id=pad_id, batch_size=batch_size)
    out = []
    for c in cands:
        hooks = skip_layers(layers, c)
        try:
            out.append(lm_nll(base, calibration, pad_id=pad_id, batch_size=batch_size) - full)
        finally:
            for h in hooks:
                h.remove()
    return out, full


@torch.no_grad()
def layer_scores(base: nn.Module, calibration: Tensor | None, *, ranking: str, n: int, contiguous: bool,
                 pad_id: int | None = None, batch_size: int = 8, seed: int = 0) -> dict:
    """Scores of the candidates (see :func:`windows`) of removing ``n`` layers of the (unwrapped, checked)
    model ``base``: {"candidates": [...], "scores": [...], "nll": full-model calibration NLL (perplexity
    ranking only)}."""
    _, _, layers = decoder_layers(base)
    cands = windows(len(layers), n, contiguous)
    out = {"ranking": ranking, "contiguous": contiguous, "candidates": [list(c) for c in cands]}
    if ranking == "random":
        g = torch.Generator().manual_seed(int(seed))
        out["scores"] = torch.rand(len(cands), generator=g, dtype=torch.float64).tolist()
    elif ranking == "block_importance":
        out["scores"] = _block_importance(base, layers, cands, calibration, pad_id, batch_size)
    elif ranking == "perplexity":
        out["scores"], out["nll"] = _perplexity_increase(base, layers, cands, calibration, pad_id, batch_size)
    else:
        raise ValueError(f"depth_ranking must be one of {DEPTH_RANKINGS}, got {ranking!r}")
    return out


def select_layers(scores: dict, n: int) -> list[int]:
    """The layers to remove: the ``n`` lowest-scored single layers, or the lowest-scored window."""
    s = torch.tensor(scores["scores"], dtype=torch.float64)
    order = torch.argsort(s, stable=True).tolist()
    cands = scores["candidates"]
    if scores["contiguous"]:
        return list(cands[order[0]]) if n else []
    return sorted(cands[i][0] for i in order[:n])


def check_depth_model(conf) -> None:
    """The (transformers) config of a model whose layers can be removed and renumbered."""
    if conf.model_type not in DEPTH_MODEL_TYPES:  # decoder_lm checked it; kept for direct callers
        raise ValueError(f"model: depth pruning supports model_type {DEPTH_MODEL_TYPES}, got {conf.model_type!r}")
    if getattr(conf, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("model: depth pruning of a GPT-2 with scale_attn_by_inverse_layer_idx=True is refused: its "
                         "attention scale is 1 / (layer index + 1), so renumbering the kept layers would change what "
                         "they compute")


@torch.no_grad()
def drop_layers(base: nn.Module, remove) -> list[int]:
    """Remove decoder layers ``remove`` (indices) from the (unwrapped, checked) model in place; renumber
    ``layer_idx`` and update the config. Returns the kept original indices."""
    parent, attr, layers = decoder_layers(base)
    remove = sorted({int(i) for i in remove})
    if any(not 0 <= i < len(layers) for i in remove) or len(remove) >= len(layers):
        raise ValueError(f"layers to remove {remove} must be distinct indices in [0, {len(layers)}), not all of them")
    kept = [i for i in range(len(layers)) if i not in remove]
    new = nn.ModuleList([layers[i] for i in kept])
    for j, layer in enumerate(new):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    setattr(parent, attr, new)
    for c in model_configs(base):
        for key in PER_LAYER_CONFIG_KEYS:
            val = getattr(c, key, None)
            if isinstance(val, (list, tuple)) and len(val) == len(layers):
                setattr(c, key, [val[i] for i in kept])
        c.num_hidden_layers = len(kept)
    return kept
