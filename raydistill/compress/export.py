"""Compressed students to safetensors and back, bit-exactly: quantized layers (int8 codes / packed int4
codes + fp32 scales), SparseLinear layers (CSR) and structurally pruned widths.

The file holds the model's state dict (QuantizedLinear: ``qweight``, ``scale``, ``bias``) and JSON
metadata (format ``raydistill-compressed-v1``): ``structure`` ({first layer of a unit pair: width}),
``quantized_layers`` ({name: in/out features, bits, group_size, activations, bias}) and ``sparse_layers``
(as :func:`raydistill.compress.save_sparse`), ``sparse_int8_layers`` (``SparseLinearInt8``: int8 CSR values,
per-row scales, 16- or 32-bit column indices). :func:`load_compressed` rebuilds those layers in a freshly
built float model (or a factory's) and loads the tensors unchanged.

:func:`export_compressed_tensors` writes a transformers causal LM whose Linear layers are
:class:`~raydistill.compress.QuantizedLinear` in the ``compressed-tensors`` layout (the one vLLM and
transformers load): ``save_pretrained`` files whose ``config.json`` carries a ``quantization_config``
(``quant_method: compressed-tensors``), built and compressed by the compressed-tensors library itself;
the codes and scales in the files are ours, bit for bit (checked before anything is written).

Public API::

    save_compressed(model, path, structure=None)
    load_compressed(model_or_factory, path) -> nn.Module
    export_compressed_tensors(model, out_dir, tokenizer=None, int8_activations=None) -> dict
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from raydistill.compress.pruner import normalize_name
from raydistill.utils import check_output_dir, replace_dir_atomically, unwrap_model

__all__ = ["save_compressed", "load_compressed", "FORMAT", "export_compressed_tensors", "CT_MIN_VERSION",
           "CT_INT8_ACTIVATIONS"]

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


_Q_RULES = {"in_features": (int,), "out_features": (int,), "bits": (int,), "group_size": (int, type(None)),
            "activations": (str, type(None)), "bias": (bool,)}
_S_RULES = {"in_features": (int,), "out_features": (int,), "nnz": (int,), "bias": (bool,)}


def _read_compressed_metadata(path) -> tuple[dict, list[tuple[str, str, dict]]]:
    """(structure, [(kind, metadata key, layers)]) of a :func:`save_compressed` file, every key checked:
    ``ValueError`` naming the file and the key for a directory, a non-safetensors file, malformed or deeply
    nested JSON, a missing key, an entry that is not an object or a field of the wrong type."""
    from raydistill.compress.checkpoint import check_layer_entries, metadata_json, read_metadata

    p = os.fspath(path)
    meta = read_metadata(p, "load_compressed", FORMAT, "compressed")
    structure = metadata_json(meta, "structure", p, default="{}")
    for name, width in structure.items():
        if type(width) is not int or width < 1:
            raise ValueError(f"{p}: metadata 'structure' entry {name!r} must be a width (an int >= 1), got {width!r}")
    tables = []
    for kind, key, default, rules in (("quantized", "quantized_layers", None, _Q_RULES),
                                      ("sparse", "sparse_layers", None, _S_RULES),
                                      ("sparse int8", "sparse_int8_layers", "{}", _S_RULES)):
        layers = check_layer_entries(metadata_json(meta, key, p, default=default), key, p, rules)
        if kind == "sparse int8":
            for name, info in layers.items():
                if not isinstance(info.get("activations"), (str, type(None))):
                    raise ValueError(f"{p}: metadata {key!r} entry {name!r}: activations must be a string or null, "
                                     f"got {info['activations']!r}")
        tables.append((kind, key, layers))
    return structure, tables


def load_compressed(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_compressed` file into a float model of the same architecture (or
    ``factory()``'s): shrink to the saved structure, swap in QuantizedLinear / SparseLinear shells, load
    the tensors (strict). Returns the (unwrapped) model.

    A file that is not one (a directory, not safetensors, another format, malformed metadata, tensors of
    the wrong shape or dtype, a sparse pattern that is not a valid CSR / bitmap of its layer) is a
    ``ValueError`` naming the file and the key or layer; nothing of it reaches a kernel unchecked."""
    from raydistill.compress.checkpoint import load_tensors_into
    from raydistill.compress.convert import _set_submodule
    from raydistill.compress.quantize import QuantizedLinear
    from raydistill.compress.structured import resize_structured
    from raydistill.ops.sparse import SparseLinear, SparseLinearInt8

    model = model_or_factory() if not isinstance(model_or_factory, nn.Module) and callable(model_or_factory) \
        else model_or_factory
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_or_factory must be an nn.Module or return one, got {type(model).__name__}")
    structure, tables = _read_compressed_metadata(path)
    base = unwrap_model(model)
    if structure:
        try:
            resize_structured(base, structure)
        except ValueError as exc:
            raise ValueError(f"load_compressed: {path}: metadata 'structure': {exc}") from None
    by_name = {normalize_name(n): (n, m) for n, m in base.named_modules()}
    for kind, key, layers in tables:
        for name, info in layers.items():
            if name not in by_name:
                raise ValueError(f"checkpoint {kind} layer {name!r} not found in the model")
            raw, mod = by_name[name]
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"checkpoint layer {name!r} is {kind} but the model's module is {type(mod).__name__}")
            if (mod.in_features, mod.out_features) != (info["in_features"], info["out_features"]):
                raise ValueError(f"layer {name!r}: checkpoint shape {info['out_features']}x{info['in_features']}, "
                                 f"model {mod.out_features}x{mod.in_features}")
            try:
                if kind == "quantized":
                    new = QuantizedLinear(mod.in_features, mod.out_features, info["bias"], bits=info["bits"],
                                          group_size=info["group_size"], activations=info["activations"])
                elif kind == "sparse int8":  # nnz and index dtype are adopted from the tensors on load
                    new = SparseLinearInt8(mod.in_features, mod.out_features, info["nnz"], bias=info["bias"],
                                           device=mod.weight.device, activations=info.get("activations"))
                else:
                    new = SparseLinear(mod.in_features, mod.out_features, info["nnz"], bias=info["bias"],
                                       device=mod.weight.device, dtype=mod.weight.dtype)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"load_compressed: {path}: metadata {key!r} entry {name!r}: {exc}") from None
            _set_submodule(base, raw, new)
    load_tensors_into(base, path, "load_compressed")
    return base


# ----------------------------------------------------------------------------------------------------
# compressed-tensors (the layout vLLM loads)

CT_MIN_VERSION = "0.20.1"
CT_INT8_ACTIVATIONS = (None, "per_token", "weight_only")
_CT_INSTALL = ("pip install 'compressed-tensors>=0.20.1' (or pip install -e '.[dev]'); it needs torch>=2.10, "
               "which the Makefile's torch 2.13.0 satisfies, so pip keeps the installed torch")


def _import_compressed_tensors():
    try:
        import compressed_tensors
    except ImportError as e:
        raise ImportError(f"export_compressed_tensors needs the compressed-tensors package ({e}): {_CT_INSTALL}") from e
    from packaging.version import Version

    if Version(compressed_tensors.__version__) < Version(CT_MIN_VERSION):
        raise ImportError(f"export_compressed_tensors needs compressed-tensors>={CT_MIN_VERSION}, found "
                          f"{compressed_tensors.__version__}: {_CT_INSTALL}")
    return compressed_tensors


def _ct_scheme_key(name: str, mod, int8_activations) -> tuple:
    """(bits, group_size, input activations) of one QuantizedLinear in compressed-tensors terms."""
    if mod.activations is None:
        return mod.bits, mod.group_size, None
    if int8_activations is None:
        raise ValueError(
            f"export_compressed_tensors: layer {name!r} quantizes its inputs (activations='int8': dynamic, per "
            "tensor, asymmetric 7-bit, as fbgemm). compressed-tensors can write dynamic int8 inputs, but the int8 "
            "scheme vLLM runs is per token and symmetric, which is not the arithmetic this model was evaluated "
            "with. Choose one: int8_activations='per_token' (W8A8: the same weights, vLLM's dynamic per-token "
            "int8 inputs) or int8_activations='weight_only' (the same weights, float inputs)")
    return mod.bits, mod.group_size, None if int8_activations == "weight_only" else "per_token"


def _ct_scheme(key: tuple, targets: list[str]):
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme, QuantizationStrategy,
                                                 QuantizationType)

    bits, group_size, acts = key
    # ours: symmetric, codes = round(w * (1/scale)) in [-127, 127] (int8) or [-8, 7] (int4), w ~ codes * scale;
    # compressed-tensors: symmetric int (no zero point), codes in [-2^(b-1), 2^(b-1) - 1], w = codes * scale
    weights = QuantizationArgs(
        num_bits=bits, type=QuantizationType.INT, symmetric=True, dynamic=False,
        strategy=QuantizationStrategy.CHANNEL if group_size is None else QuantizationStrategy.GROUP,
        group_size=group_size)
    inputs = None if acts is None else QuantizationArgs(
        num_bits=8, type=QuantizationType.INT, symmetric=True, dynamic=True, strategy=QuantizationStrategy.TOKEN)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)


def _ct_check_layers(base: nn.Module, int8_activations) -> tuple[dict, list[str]]:
    """{name: (QuantizedLinear, scheme key)} and the float nn.Linear names; an error for anything else."""
    from raydistill.compress.quantize import FakeQuantLinear, QuantizedLinear
    from raydistill.ops.sparse import SparseLinear, SparseLinearInt8

    quantized, floats = {}, []
    for name, mod in base.named_modules():
        kind = type(mod).__name__
        if isinstance(mod, (SparseLinear, SparseLinearInt8)):
            raise TypeError(
                f"export_compressed_tensors: layer {name!r} is {kind}: compressed-tensors has no layout for CSR or "
                "bitmap sparse weights (vLLM's sparse path is 2:4 on dense tensors). Rule: every Linear layer must be "
                "a QuantizedLinear or a float nn.Linear; use save_compressed for sparse students")
        if isinstance(mod, FakeQuantLinear):
            raise TypeError(
                f"export_compressed_tensors: layer {name!r} is FakeQuantLinear (quantization-aware training still "
                "holds float weights); run raydistill.compress.quantize(model, ...) first to store its codes")
        if isinstance(mod, QuantizedLinear):
            quantized[name] = (mod, _ct_scheme_key(name, mod, int8_activations))
        elif type(mod) is nn.Linear:
            floats.append(name)
        elif isinstance(mod, nn.Linear) or any(w in kind.lower() for w in ("quant", "sparse")):
            raise TypeError(f"export_compressed_tensors: layer {name!r} of type {kind} has no compressed-tensors "
                            "mapping; rule: only QuantizedLinear and float nn.Linear layers are exported")
    if not quantized:
        raise ValueError("export_compressed_tensors: the model has no QuantizedLinear layer (quantize it first with "
                         "raydistill.compress.quantize, or write a float model with save_pretrained)")
    return quantized, floats


def _ct_codes(mod, bits: int, shape: tuple[int, int]):
    """The integer codes that compressed-tensors holds for one compressed module (int8, (out, in))."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    sd = dict(mod.named_parameters(recurse=False), **dict(mod.named_buffers(recurse=False)))
    if "weight_packed" in sd:
        return unpack_from_int32(sd["weight_packed"].data, bits, torch.Size(shape))
    return sd["weight"].data


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, *,
                              int8_activations: str | None = None) -> dict:
    """Write a transformers causal LM with :class:`QuantizedLinear` layers as a compressed-tensors checkpoint.

    ``out_dir`` (written into a temporary sibling, then renamed; an existing ``out_dir`` is replaced only when
    it is an earlier export of ours, marked by ``.raydistill-export.json``: a file, a symbolic link or any other
    non-empty directory is a ValueError before anything is written) gets ``config.json`` (with
    ``quantization_config``: ``quant_method: compressed-tensors``, ``format``, ``config_groups``, ``ignore``,
    ``quantization_status: compressed``), ``model.safetensors``
    (per quantized layer ``weight_packed`` int32 + ``weight_shape`` for weight-only schemes, ``weight`` int8
    for W8A8; ``weight_scale`` fp32, bias; float layers as they are) and the tokenizer if one is given.

    Mapping (symmetric weights, no zero point): bits 8 / 4 -> ``num_bits`` 8 / 4; ``group_size=None`` ->
    strategy ``channel``, else ``group`` with that group size. The config and the compressed tensors are made
    by the library (``apply_quantization_config``, ``ModelCompressor``) from our dequantized weights and our
    scales; before writing, every layer's codes and scales are checked to equal ours bit for bit.

    ``int8_activations`` (for layers quantized with ``activations='int8'``; an error names the layer if
    such a layer exists and this is None): ``'per_token'`` writes W8A8 (dynamic per-token symmetric int8
    inputs, vLLM's int8 scheme; not the per-tensor 7-bit arithmetic of our fbgemm path) and
    ``'weight_only'`` drops the input quantization.

    Errors: ImportError without compressed-tensors>=0.20.1; TypeError for a model without ``save_pretrained``
    and for SparseLinear / SparseLinearInt8 / FakeQuantLinear / other unmapped layers (naming the layer);
    ValueError for a model with no QuantizedLinear, a bad ``int8_activations``, and a quantized output
    embedding that the config ties to the input embedding. The model is not changed (a copy is exported).
    Returns a summary: path, format, quantization_config (as written), layers {name: scheme}, ignore."""
    _import_compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    from raydistill.compress.convert import _set_submodule
    from raydistill.compress.quantize import QuantizedLinear

    if int8_activations not in CT_INT8_ACTIVATIONS:
        raise ValueError(f"int8_activations must be one of {CT_INT8_ACTIVATIONS}, got {int8_activations!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_output_dir(out_dir, key="out_dir")  # before any work: a file, a link, someone else's directory
    base = unwrap_model(model)
    if not (hasattr(base, "save_pretrained") and hasattr(base, "config")):
        raise TypeError(f"export_compressed_tensors: {type(base).__name__} is not a transformers model (no "
                        "save_pretrained / config); compressed-tensors checkpoints are transformers directories")
    quantized, floats = _ct_check_layers(base, int8_activations)
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(out_emb, QuantizedLinear):
        out_name = next(n for n, m in base.named_modules() if m is out_emb)
        text_cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        if getattr(text_cfg, "tie_word_embeddings", False):
            raise ValueError(
                f"export_compressed_tensors: the output embedding {out_name!r} is quantized but the config ties it "
                "to the input embedding (tie_word_embeddings=True), so a loader would replace it with the float "
                f"embedding; quantize with exclude=[{out_name!r}] or untie the embeddings")
        warnings.warn(f"export_compressed_tensors: the output embedding {out_name!r} is quantized; compressed-tensors "
                      "and transformers load it, but vLLM builds lm_head as an unquantized embedding and expects it "
                      f"in `ignore` (quantize with exclude=[{out_name!r}] for vLLM)", stacklevel=2)

    # the float copy that the library quantizes: our dequantized weights (codes * scales, fp32, exactly
    # what QuantizedLinear.forward multiplies with) in plain nn.Linear layers
    work = copy.deepcopy(base).cpu()
    ours = {}
    for name, (mod, key) in quantized.items():
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(mod.dequantize().float().cpu())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.float().cpu())
        _set_submodule(work, name, lin)
        ours[name] = (mod.codes().cpu(), mod.scale.float().cpu(), key)

    groups: dict[tuple, list[str]] = {}
    for name, (_, _, key) in ours.items():
        groups.setdefault(key, []).append(name)
    # one scheme: target the class (as llm-compressor writes it, which vLLM matches on fused layers too);
    # several: each group targets its layers by name
    config_groups = {f"group_{i}": _ct_scheme(key, ["Linear"] if len(groups) == 1 else names)
                     for i, (key, names) in enumerate(groups.items())}
    qconfig = QuantizationConfig(config_groups=config_groups, ignore=floats,
                                 quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(work, qconfig, show_progress=False)
    with torch.no_grad():
        for name, (codes, scale, key) in ours.items():
            lin = work.get_submodule(name)
            if getattr(lin, "quantization_scheme", None) is None:  # pragma: no cover - a target did not match
                raise RuntimeError(f"export_compressed_tensors: compressed-tensors did not match layer {name!r}")
            if lin.weight_scale.shape != scale.shape or lin.weight_scale.dtype != torch.float32:
                raise ValueError(f"export_compressed_tensors: layer {name!r}: compressed-tensors expects weight_scale "
                                 f"{tuple(lin.weight_scale.shape)} {lin.weight_scale.dtype}, ours is "
                                 f"{tuple(scale.shape)} float32")
            lin.weight_scale.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(work)
    compressor.compress_model(work)

    # the library re-derives codes as round(w / scale) from w = codes * scale: check it gave back ours
    layers = {}
    for name, (codes, scale, key) in ours.items():
        lin = work.get_submodule(name)
        got = _ct_codes(lin, key[0], tuple(codes.shape))
        if not (torch.equal(got.to(torch.int8), codes) and torch.equal(lin.weight_scale.data, scale)):
            raise RuntimeError(f"export_compressed_tensors: layer {name!r}: compressed-tensors' codes or scales "
                               "differ from ours; refusing to write a re-quantized checkpoint")
        layers[name] = {"bits": key[0], "group_size": key[1], "input_activations": key[2],
                        "format": str(getattr(lin.quantization_scheme.format, "value", lin.quantization_scheme.format))}

    def write(tmp: Path) -> None:
        work.save_pretrained(str(tmp))
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    out = replace_dir_atomically(out_dir, write, key="out_dir", description="export_compressed_tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    return {"path": str(out), "format": qc["format"], "quantization_config": qc, "layers": layers,
            "ignore": qc.get("ignore", [])}
