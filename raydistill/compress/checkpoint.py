"""Sparse checkpoints with safetensors: CSR tensors + metadata to rebuild the SparseLinear structure."""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
from torch import nn

from raydistill.compress.pruner import normalize_name
from raydistill.ops.sparse import SparseLinear
from raydistill.utils import unwrap_model

__all__ = ["save_sparse", "load_sparse", "FORMAT"]

FORMAT = "raydistill-sparse-v1"


def save_sparse(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model``'s state dict (SparseLinear layers as CSR: values, int32 indices, transposed
    pattern) to a safetensors file, with metadata describing each SparseLinear layer."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    base = unwrap_model(model)
    layers = {}
    for name, mod in base.named_modules():
        if isinstance(mod, SparseLinear):
            layers[normalize_name(name)] = {"in_features": mod.in_features, "out_features": mod.out_features,
                                            "nnz": mod.nnz, "bias": mod.bias is not None,
                                            "dtype": str(mod.values.dtype).removeprefix("torch.")}
    tensors = {}
    for k, v in base.state_dict().items():
        tensors[normalize_name(k)] = v.detach().cpu().contiguous().clone()
    meta = {"format": FORMAT, "sparse_layers": json.dumps(layers)}
    save_file(tensors, str(path), metadata=meta)


_LAYER_KEYS = {"in_features": int, "out_features": int, "nnz": int, "bias": bool}


def _read_sparse_metadata(path) -> dict:
    """The checked ``sparse_layers`` metadata of a :func:`save_sparse` file; ``ValueError`` naming the file
    and the problem for a directory, a missing file, a non-safetensors file or crafted metadata."""
    from safetensors import SafetensorError, safe_open

    p = os.fspath(path)
    if os.path.isdir(p):
        raise ValueError(f"load_sparse: {p} is a directory; pass the .safetensors file written by save_sparse")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"load_sparse: no such file {p}")
    try:
        with safe_open(p, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"load_sparse: {p} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p} is not a raydistill sparse checkpoint (format={meta.get('format')!r})")
    try:
        layers = json.loads(meta.get("sparse_layers", ""))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: metadata 'sparse_layers' is not valid JSON ({exc})") from None
    if not isinstance(layers, dict):
        raise ValueError(f"{p}: metadata 'sparse_layers' must be a JSON object, got {type(layers).__name__}")
    for name, info in layers.items():
        if not isinstance(info, dict) or set(info) < set(_LAYER_KEYS):
            raise ValueError(f"{p}: metadata 'sparse_layers' entry {name!r} must be an object with keys "
                             f"{sorted(_LAYER_KEYS)}, got {info!r}")
        for key, typ in _LAYER_KEYS.items():
            v = info[key]
            if typ is int and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{p}: metadata 'sparse_layers' entry {name!r}: {key} must be an int >= 0, got {v!r}")
            if typ is bool and not isinstance(v, bool):
                raise ValueError(f"{p}: metadata 'sparse_layers' entry {name!r}: {key} must be true or false, "
                                 f"got {v!r}")
        if info["nnz"] > info["in_features"] * info["out_features"]:
            raise ValueError(f"{p}: metadata 'sparse_layers' entry {name!r}: nnz {info['nnz']} exceeds "
                             f"{info['out_features']}x{info['in_features']}")
    return layers


def load_sparse(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | os.PathLike, *,
                strict: bool = True) -> nn.Module:
    """Load a :func:`save_sparse` checkpoint into a model (or ``factory()``'s fresh dense model).

    nn.Linear layers that were sparse when saved are replaced by SparseLinear layers of the saved
    pattern (same device/dtype as the layer they replace), then the state dict is loaded. Returns the
    model (the unwrapped one if a DDP-wrapped model was given, which is modified in place).
    """
    from safetensors.torch import load_file

    if isinstance(model_or_factory, nn.Module):
        model = model_or_factory
    elif callable(model_or_factory):
        model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_or_factory() must return an nn.Module, got {type(model).__name__}")
    else:
        raise TypeError(f"model_or_factory must be an nn.Module or a callable, got {type(model_or_factory).__name__}")
    layers = _read_sparse_metadata(path)
    base = unwrap_model(model)
    by_name = {normalize_name(n): (n, m) for n, m in base.named_modules()}
    for name, info in layers.items():
        if name not in by_name:
            raise ValueError(f"checkpoint layer {name!r} not found in the model")
        raw, mod = by_name[name]
        if isinstance(mod, SparseLinear):
            continue
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"checkpoint layer {name!r} is sparse but the model's module is {type(mod).__name__}")
        if (mod.in_features, mod.out_features) != (info["in_features"], info["out_features"]):
            raise ValueError(f"layer {name!r}: checkpoint shape {info['out_features']}x{info['in_features']}, "
                             f"model {mod.out_features}x{mod.in_features}")
        sl = SparseLinear(mod.in_features, mod.out_features, info["nnz"], bias=info["bias"],
                          device=mod.weight.device, dtype=mod.weight.dtype)
        parent_name, _, attr = raw.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, attr, sl)
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError / OSError on a damaged file
        raise ValueError(f"load_sparse: cannot read the tensors of {path} ({exc})") from None
    own = {normalize_name(k): k for k in base.state_dict()}
    state = {own.get(k, k): v for k, v in state.items()}
    base.load_state_dict(state, strict=strict)
    return base
