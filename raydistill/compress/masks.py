"""Pruning masks: unstructured magnitude (per layer or global), N:M and block. True = keep.

All masks are deterministic: ties in magnitude are broken by position (the entry with the lower
flattened index is pruned first), so the same weights always give the same mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["magnitude_mask", "global_magnitude_masks", "nm_mask", "block_mask", "check_sparsity",
           "num_pruned"]


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Validate sparsity in [0, 1); returns it as float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(sparsity).__name__}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {sparsity}")
    return s


def _check_weight(weight: Tensor, name: str = "weight", dim: int | None = None) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point Tensor, got {weight.dtype}")
    if dim is not None and weight.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(weight.shape)}")


def num_pruned(numel: int, sparsity: float) -> int:
    """Number of zeros a mask of ``numel`` entries at ``sparsity`` has: round-half-even(sparsity*numel)."""
    return int(round(sparsity * numel))


def _prune_lowest(scores: Tensor, k: int) -> Tensor:
    """Flat bool keep-mask pruning the k lowest scores (stable: lower index first on ties)."""
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.argsort(flat, stable=True)
        keep[order[:k]] = False
    return keep


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Keep the largest-|w| entries: exactly ``round(sparsity * numel)`` entries are False."""
    _check_weight(weight)
    s = check_sparsity(sparsity)
    k = num_pruned(weight.numel(), s)
    scores = weight.detach().abs().to(torch.float32)
    return _prune_lowest(scores, k).reshape(weight.shape)


def global_magnitude_masks(weights: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """One magnitude threshold over all tensors: exactly ``round(sparsity * total)`` zeros overall.

    Raw magnitudes are compared across tensors (no per-layer normalisation). Ties are broken by the
    dict order, then position.
    """
    s = check_sparsity(sparsity)
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict[str, Tensor], got {type(weights).__name__}")
    if not weights:
        return {}
    for name, w in weights.items():
        _check_weight(w, f"weights[{name!r}]")
    flat = torch.cat([w.detach().abs().to("cpu", torch.float32).reshape(-1) for w in weights.values()])
    keep = _prune_lowest(flat, num_pruned(flat.numel(), s))
    out, i = {}, 0
    for name, w in weights.items():
        out[name] = keep[i:i + w.numel()].reshape(w.shape).to(w.device)
        i += w.numel()
    return out


def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """N:M mask along the input (last) dim: in every group of ``m`` consecutive entries of a row the
    ``n`` largest |w| are kept (ties: lower index kept).

    When ``in_features % m != 0`` the last, shorter group of ``r`` entries keeps ``min(n, r)`` of them
    (so every group holds at most ``n`` nonzeros). Works for any tensor with >= 1 dim.
    """
    _check_weight(weight)
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if n < 0 or n > m:
        raise ValueError(f"n must be in [0, m={m}] (N:M keeps n of every m), got n={n}")
    if weight.dim() == 0:
        raise ValueError("weight must have at least 1 dim")
    shape = weight.shape
    cols = shape[-1]
    rows = weight.numel() // cols if cols else 0
    if weight.numel() == 0:
        return torch.ones(shape, dtype=torch.bool, device=weight.device)
    groups = -(-cols // m)
    pad = groups * m - cols
    scores = weight.detach().abs().to(torch.float32).reshape(rows, cols)
    if pad:
        scores = torch.cat([scores, scores.new_full((rows, pad), -1.0)], dim=1)  # padding never wins
    g = scores.reshape(rows, groups, m)
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, order, True)
    keep = keep.reshape(rows, groups * m)[:, :cols]
    return keep.reshape(shape)


def _block_shape(block) -> tuple[int, int]:
    if isinstance(block, bool):
        raise TypeError("block must be an int or a (rows, cols) tuple of ints")
    if isinstance(block, int):
        b = (block, block)
    elif isinstance(block, (tuple, list)) and len(block) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in block):
        b = (int(block[0]), int(block[1]))
    else:
        raise TypeError(f"block must be an int or a (rows, cols) tuple of ints, got {block!r}")
    if b[0] < 1 or b[1] < 1:
        raise ValueError(f"block sizes must be >= 1, got {b}")
    return b


def block_mask(weight: Tensor, sparsity: float, block: int | tuple[int, int] = 4) -> Tensor:
    """Block mask for a 2-D weight: (bh x bw) tiles are kept or zeroed whole.

    * Blocks are scored by their mean |w| (L1 norm / number of entries), so partial edge blocks (when
      the block does not divide the shape) are blocks too and compete fairly.
    * The target counts weights: the lowest-scoring blocks are pruned (ties: lower block index first,
      row-major) while the number of pruned weights stays <= ``round(sparsity * numel)``; the first
      block that would overshoot stops the pruning. The achieved sparsity is therefore at most the
      target and within one block (bh*bw weights) of it.
    """
    _check_weight(weight, dim=2)
    s = check_sparsity(sparsity)
    bh, bw = _block_shape(block)
    rows, cols = weight.shape
    if weight.numel() == 0:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    gr, gc = -(-rows // bh), -(-cols // bw)
    a = weight.detach().abs().to(torch.float32)
    pad = torch.zeros(gr * bh, gc * bw, dtype=torch.float32, device=weight.device)
    pad[:rows, :cols] = a
    cnt = torch.zeros_like(pad)
    cnt[:rows, :cols] = 1.0
    sums = pad.reshape(gr, bh, gc, bw).sum(dim=(1, 3))
    sizes = cnt.reshape(gr, bh, gc, bw).sum(dim=(1, 3))
    scores = (sums / sizes).reshape(-1)
    k = num_pruned(weight.numel(), s)
    order = torch.argsort(scores, stable=True)
    csum = torch.cumsum(sizes.reshape(-1)[order], 0)
    nblocks = int((csum <= k).sum()) if k > 0 else 0
    # csum is increasing: the prefix with csum <= k is exactly the blocks before the first overshoot
    keep_blocks = torch.ones(gr * gc, dtype=torch.bool, device=weight.device)
    keep_blocks[order[:nblocks]] = False
    keep = keep_blocks.reshape(gr, 1, gc, 1).expand(gr, bh, gc, bw).reshape(gr * bh, gc * bw)
    return keep[:rows, :cols].contiguous()
