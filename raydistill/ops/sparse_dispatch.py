"""Which path a CUDA ``SparseLinear`` call takes: the CSR kernel or the masked-dense cuBLAS matmul.

A CSR SpMM wins when its bytes (values + column indices) are well under the dense weight's and the batch
is small; at large batches or low sparsity cuBLAS wins. Where the crossover falls depends on the GPU,
the shape, the batch, the sparsity and the dtype, so it is *measured* the first time a layer meets a
(device, dtype, out x in, sparsity, batch) combination: both paths run the forward a few times under
CUDA events and the faster one is remembered (in memory, and in a JSON file under the raydistill cache
directory, so later processes skip the measurement). ``raydistill info`` lists the cached decisions.

Keys bucket the sparsity to 0.05 and the batch (rows of ``x``) to the next power of two. A decision
takes a few milliseconds once per key. ``RAYDISTILL_SPMM_PATH=sparse|dense|auto`` forces a path
(``auto``, the default, measures). CPU calls always take the CSR kernels (see docs/sparse.md).

The dense path keeps a dense copy of the weight on the device (its bytes are what the sparse format
saves), refreshed by one scatter of the values when they change (e.g. after an optimizer step).
Gradients still flow to ``values`` (gathered from the dense weight gradient) and ``bias``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from raydistill.utils import cuda_median_ms

__all__ = ["choose_path", "dispatch_key", "cached_decisions", "cache_file", "PATH_ENV"]

PATH_ENV = "RAYDISTILL_SPMM_PATH"
_lock = threading.Lock()
_decisions: dict[str, str] | None = None


def cache_file() -> Path:
    from raydistill._build import cache_root

    return cache_root() / "spmm_dispatch.json"


def _load() -> dict[str, str]:
    global _decisions
    if _decisions is None:
        try:
            data = json.loads(cache_file().read_text())
            _decisions = {str(k): str(v) for k, v in data.items() if v in ("sparse", "dense")}
        except (OSError, ValueError):
            _decisions = {}
    return _decisions


def _save() -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_decisions, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement in the next process


def cached_decisions() -> dict[str, str]:
    """The decisions measured so far (this process and the cache file)."""
    with _lock:
        return dict(_load())


def _batch_bucket(n: int) -> int:
    b = 1
    while b < n:
        b <<= 1
    return b


def dispatch_key(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int,
                 sparsity: float, batch: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (f"{name}|{str(dtype).replace('torch.', '')}|{out_features}x{in_features}"
            f"|s{round(sparsity * 20) / 20:.2f}|b{_batch_bucket(batch)}")


def _measure(layer, batch: int, dtype: torch.dtype, device: torch.device) -> str:
    x = torch.randn(_batch_bucket(batch), layer.in_features, device=device, dtype=dtype)
    with torch.no_grad():
        w = layer.dense_weight_cache()
        t_sparse = cuda_median_ms(lambda: layer._spmm(x))
        t_dense = cuda_median_ms(lambda: F.linear(x, w, layer.bias))
    return "sparse" if t_sparse < t_dense else "dense"


def choose_path(layer, x: Tensor) -> str:
    """'sparse' or 'dense' for this call of ``layer`` (a CUDA ``SparseLinear``) on ``x``."""
    forced = os.environ.get(PATH_ENV, "auto")
    if forced in ("sparse", "dense"):
        return forced
    batch = x.numel() // max(x.shape[-1], 1)
    if torch.cuda.is_current_stream_capturing():
        # no timing inside a CUDA graph capture: use a cached decision or the static rule
        key = dispatch_key(x.device, x.dtype, layer.out_features, layer.in_features, layer.sparsity, batch)
        return _load().get(key) or ("sparse" if layer.sparsity >= 0.9 and batch <= 16 else "dense")
    key = dispatch_key(x.device, x.dtype, layer.out_features, layer.in_features, layer.sparsity, batch)
    decisions = _decisions if _decisions is not None else _load()
    path = decisions.get(key)
    if path is None:
        path = _measure(layer, batch, x.dtype, x.device)
        with _lock:
            _load()[key] = path
            _save()
    return path
