"""Fused torch ops: the distillation loss and sparse matmul for pruned linear layers.

Imports are lazy so that ``import raydistill.ops`` neither builds nor loads the extension; the first
call of an op does (see ``raydistill._build``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "kd_loss": "raydistill.ops.kd_loss",
    "kd_loss_topk": "raydistill.ops.kd_loss",
    "KDLoss": "raydistill.ops.kd_loss",
    "kd_loss_reference": "raydistill.ops.kd_loss",
    "SparseLinear": "raydistill.ops.sparse",
    "sparse_linear": "raydistill.ops.sparse",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'raydistill.ops' has no attribute {name!r}")
    module = importlib.import_module(mod)
    # Bind every export of that module now: importing ``raydistill.ops.kd_loss`` sets the package attribute
    # ``kd_loss`` to the submodule, which would otherwise shadow the function of the same name.
    for export, where in _EXPORTS.items():
        if where == mod:
            globals()[export] = getattr(module, export)
    return globals()[name]
