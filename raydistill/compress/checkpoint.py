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
_NONE = type(None)


def read_metadata(path, fn: str, fmt: str, what: str) -> dict[str, str]:
    """The metadata of a raydistill safetensors file; ``ValueError`` naming the file for a directory, a
    non-safetensors or damaged file, or another format (``FileNotFoundError`` for a missing file). ``fn`` is
    the function named in the message, ``fmt`` the expected ``format`` and ``what`` its description."""
    from safetensors import SafetensorError, safe_open

    p = os.fspath(path)
    if os.path.isdir(p):
        raise ValueError(f"{fn}: {p} is a directory; pass the .safetensors file written by {what}")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{fn}: no such file {p}")
    try:
        with safe_open(p, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{fn}: {p} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != fmt:
        raise ValueError(f"{p} is not a raydistill {what} checkpoint (format={meta.get('format')!r})")
    return meta


def metadata_json(meta: dict, key: str, path, *, default: str | None = None) -> dict:
    """``meta[key]`` parsed as a JSON object (``default`` when the key is absent; required when None);
    ``ValueError`` naming the file and the key for a missing key, malformed or too deeply nested JSON."""
    text = meta.get(key, default)
    if text is None:
        raise ValueError(f"{path}: metadata key {key!r} is missing")
    try:
        out = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: metadata {key!r} is nested too deeply to be a raydistill checkpoint") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: metadata {key!r} must be a JSON object, got {type(out).__name__}")
    return out


def check_layer_entries(layers: dict, key: str, path, rules: dict) -> dict:
    """Each entry of a ``{layer name: {field: value}}`` metadata table must be an object holding the fields of
    ``rules`` ({field: allowed types}; an int is >= 0 and never a bool); ``nnz`` at most out x in."""
    for name, info in layers.items():
        if not isinstance(info, dict) or not set(rules) <= set(info):
            raise ValueError(f"{path}: metadata {key!r} entry {name!r} must be an object with keys "
                             f"{sorted(rules)}, got {info!r}")
        for field, types in rules.items():
            v = info[field]
            ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types) \
                and not (type(v) is int and v < 0)
            if not ok:
                want = " or ".join("null" if t is _NONE else "true or false" if t is bool else
                                   "an int >= 0" if t is int else f"a {t.__name__}" for t in types)
                raise ValueError(f"{path}: metadata {key!r} entry {name!r}: {field} must be {want}, got {v!r}")
        if "nnz" in rules and info["nnz"] > info["in_features"] * info["out_features"]:
            raise ValueError(f"{path}: metadata {key!r} entry {name!r}: nnz {info['nnz']} exceeds "
                             f"{info['out_features']}x{info['in_features']}")
    return layers


def _read_sparse_metadata(path) -> dict:
    """The checked ``sparse_layers`` metadata of a :func:`save_sparse` file; ``ValueError`` naming the file and
    the problem for a directory, a missing file, a non-safetensors file or crafted metadata."""
    meta = read_metadata(path, "load_sparse", FORMAT, "sparse")
    layers = metadata_json(meta, "sparse_layers", os.fspath(path), default="")
    return check_layer_entries(layers, "sparse_layers", os.fspath(path), {k: (t,) for k, t in _LAYER_KEYS.items()})


def load_tensors_into(base: nn.Module, path, fn: str, *, strict: bool = True) -> None:
    """Load a safetensors file's tensors into ``base`` (names normalised); every problem of the file (damaged
    tensors, wrong shapes or dtypes, a malformed sparse pattern: checked by the layers as they load) is a
    ``ValueError`` naming ``fn``, the file and the layer."""
    from safetensors.torch import load_file

    try:
        state = load_file(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError / OSError on a damaged file
        raise ValueError(f"{fn}: cannot read the tensors of {path} ({exc})") from None
    own = {normalize_name(k): k for k in base.state_dict()}
    try:
        base.load_state_dict({own.get(k, k): v for k, v in state.items()}, strict=strict)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{fn}: {path}: {exc}") from None


def load_sparse(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | os.PathLike, *,
                strict: bool = True) -> nn.Module:
    """Load a :func:`save_sparse` checkpoint into a model (or ``factory()``'s fresh dense model).

    nn.Linear layers that were sparse when saved are replaced by SparseLinear layers of the saved
    pattern (same device/dtype as the layer they replace), then the state dict is loaded. Returns the
    model (the unwrapped one if a DDP-wrapped model was given, which is modified in place).
    """
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
    load_tensors_into(base, path, "load_sparse", strict=strict)
    return base
