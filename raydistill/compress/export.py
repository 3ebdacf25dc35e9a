"""Compressed students to safetensors and back, bit-exactly: quantized layers (int8 codes / packed int4
codes + fp32 scales), SparseLinear layers (CSR) and structurally pruned widths.

The file holds the model's state dict (QuantizedLinear: ``qweight``, ``scale``, ``bias``) and JSON
metadata (format ``raydistill-compressed-v1``): ``structure`` ({first layer of a unit pair: width}),
``quantized_layers`` ({name: in/out features, bits, group_size, activations, bias}) and ``sparse_layers``
(as :func:`raydistill.compress.save_sparse`), ``sparse_int8_layers`` (``SparseLinearInt8``: int8 CSR values,
per-row scales, 16- or 32-bit column indices). :func:`load_compressed` rebuilds those layers in a freshly
built float model (or a factory's) and loads the tensors unchanged.

Public API::

    save_compressed(model, path, structure=None)
    load_compressed(model_or_factory, path) -> nn.Module
"""

from __future__ import annotations

import json
import os
from typing import Callable

from torch import nn

from raydistill.compress.pruner import normalize_name, unwrap_model

__all__ = ["save_compressed", "load_compressed", "FORMAT"]

FORMAT = "raydistill-compressed-v1"


def save_compressed(model: nn.Module, path: str | os.PathLike, structure: dict | None = None) -> None:
    """Save a compressed model (QuantizedLinear, SparseLinear, SparseLinearInt8, nn.Linear layers) to safetensors.
    ``structure``: the widths of a structurally pruned model (``StructuredReport.widths``) so that the
    loader can shrink a freshly built model first."""
    from safetensors.torch import save_file

    from raydistill.compress.quantize import QuantizedLinear
    from raydistill.ops.sparse import SparseLinear, SparseLinearInt8

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    base = unwrap_model(model)
    qlayers, slayers, s8layers = {}, {}, {}
    for name, mod in base.named_modules():
        n = normalize_name(name)
        if isinstance(mod, QuantizedLinear):
            qlayers[n] = {"in_features": mod.in_features, "out_features": mod.out_features, "bits": mod.bits,
                          "group_size": mod.group_size, "activations": mod.activations,
                          "bias": mod.bias is not None}
        elif type(mod) is SparseLinear:
            slayers[n] = {"in_features": mod.in_features, "out_features": mod.out_features, "nnz": mod.nnz,
                          "bias": mod.bias is not None}
        elif type(mod) is SparseLinearInt8:
            s8layers[n] = {"in_features": mod.in_features, "out_features": mod.out_features, "nnz": mod.nnz,
                           "bias": mod.bias is not None, "activations": mod.activations}
        elif not isinstance(mod, nn.Linear) and "quantize" in type(mod).__name__.lower():
            raise TypeError(f"save_compressed: layer {n!r} of type {type(mod).__name__} is not supported")
    tensors = {normalize_name(k): v.detach().cpu().contiguous().clone() for k, v in base.state_dict().items()}
    meta = {"format": FORMAT, "quantized_layers": json.dumps(qlayers), "sparse_layers": json.dumps(slayers),
            "sparse_int8_layers": json.dumps(s8layers),
            "structure": json.dumps(structure or {})}
    save_file(tensors, str(path), metadata=meta)


def load_compressed(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_compressed` file into a float model of the same architecture (or
    ``factory()``'s): shrink to the saved structure, swap in QuantizedLinear / SparseLinear shells, load
    the tensors (strict). Returns the (unwrapped) model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from raydistill.compress.convert import _set_submodule
    from raydistill.compress.quantize import QuantizedLinear
    from raydistill.compress.structured import resize_structured
    from raydistill.ops.sparse import SparseLinear, SparseLinearInt8

    model = model_or_factory() if not isinstance(model_or_factory, nn.Module) and callable(model_or_factory) \
        else model_or_factory
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_or_factory must be an nn.Module or return one, got {type(model).__name__}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a raydistill compressed checkpoint (format={meta.get('format')!r})")
    base = unwrap_model(model)
    structure = json.loads(meta.get("structure") or "{}")
    if structure:
        resize_structured(base, structure)
    by_name = {normalize_name(n): (n, m) for n, m in base.named_modules()}
    for kind, layers in (("quantized", json.loads(meta["quantized_layers"])),
                         ("sparse", json.loads(meta["sparse_layers"])),
                         ("sparse int8", json.loads(meta.get("sparse_int8_layers") or "{}"))):
        for name, info in layers.items():
            if name not in by_name:
                raise ValueError(f"checkpoint {kind} layer {name!r} not found in the model")
            raw, mod = by_name[name]
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"checkpoint layer {name!r} is {kind} but the model's module is {type(mod).__name__}")
            if (mod.in_features, mod.out_features) != (info["in_features"], info["out_features"]):
                raise ValueError(f"layer {name!r}: checkpoint shape {info['out_features']}x{info['in_features']}, "
                                 f"model {mod.out_features}x{mod.in_features}")
            if kind == "quantized":
                new = QuantizedLinear(mod.in_features, mod.out_features, info["bias"], bits=info["bits"],
                                      group_size=info["group_size"], activations=info["activations"])
            elif kind == "sparse int8":  # nnz and index dtype are adopted from the tensors on load
                new = SparseLinearInt8(mod.in_features, mod.out_features, info["nnz"], bias=info["bias"],
                                       device=mod.weight.device, activations=info.get("activations"))
            else:
                new = SparseLinear(mod.in_features, mod.out_features, info["nnz"], bias=info["bias"],
                                   device=mod.weight.device, dtype=mod.weight.dtype)
            _set_submodule(base, raw, new)
    state = load_file(str(path))
    own = {normalize_name(k): k for k in base.state_dict()}
    base.load_state_dict({own.get(k, k): v for k, v in state.items()}, strict=True)
    return base
