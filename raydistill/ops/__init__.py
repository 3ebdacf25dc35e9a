"""Fused torch ops: the distillation loss (also fused with the lm_head matmul) and sparse matmul for pruned linear layers.

Imports are lazy so that ``import raydistill.ops`` neither builds nor loads the extension; the first
call of an op does (see ``raydistill._build``).
"""

from __future__ import annotations

from raydistill._lazy import lazy_getattr

_EXPORTS = {
    "kd_loss": "raydistill.ops._kd_loss",
    "kd_loss_topk": "raydistill.ops._kd_loss",
    "KDLoss": "raydistill.ops._kd_loss",
    "kd_loss_reference": "raydistill.ops._kd_loss",
    "kd_loss_linear": "raydistill.ops._kd_loss_linear",
    "kd_loss_linear_topk": "raydistill.ops._kd_loss_linear",
    "KDLossLinear": "raydistill.ops._kd_loss_linear",
    "kd_loss_linear_reference": "raydistill.ops._kd_loss_linear",
    "MAX_TEMPERATURE": "raydistill.ops._kd_loss",
    "SparseLinear": "raydistill.ops.sparse",
    "sparse_linear": "raydistill.ops.sparse",
    "SparseLinearInt8": "raydistill.ops.sparse",
    "sparse_linear_int8": "raydistill.ops.sparse",
}

__all__ = sorted(_EXPORTS)


# The implementation modules are private and named unlike their exports (``_kd_loss`` holds
# ``kd_loss``), so importing a submodule can never shadow a function on the package.
__getattr__ = lazy_getattr(__name__, _EXPORTS)
