"""Convert pruned nn.Linear layers to SparseLinear and account for model size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from raydistill.compress.pruner import (METHODS, SCOPES, check_patterns_match, compute_masks, normalize_name,
                                        select_linear_layers)
from raydistill.ops.sparse import SparseLinear, csr_nbytes
from raydistill.utils import unwrap_model

__all__ = ["LayerReport", "CompressionReport", "compress", "model_sparsity_report", "csr_nbytes"]

@dataclass
class LayerReport:
    """One compressed layer's weight (bias excluded; biases count under the model totals)."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    sparsity: float
    params: int  # dense weight entries
    nonzeros: int
    dense_bytes: int
    csr_bytes: int


@dataclass
class CompressionReport:
    """Size accounting of a model whose ``layers`` are (or would be) stored in CSR.

    Totals are over the whole model's parameters: ``params`` counts every parameter densely (a
    SparseLinear counts out*in + bias), ``nonzero_params`` counts nonzeros of the sparse layers plus
    every other parameter entry, ``dense_bytes``/``compressed_bytes`` the bytes stored densely vs with the
    sparse layers in CSR (int32 indices), ``compression_ratio = dense_bytes / compressed_bytes``.
    ``total_sparsity`` is the fraction of zeros over the compressed layers' weights only. Buffers (other
    than the CSR indices) are not counted.
    """

    layers: list[LayerReport] = field(default_factory=list)
    total_sparsity: float = 0.0
    params: int = 0
    nonzero_params: int = 0
    dense_bytes: int = 0
    compressed_bytes: int = 0
    compression_ratio: float = 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for row in d["layers"]:
            row["shape"] = list(row["shape"])
        return d

    def table(self, title: str = "compression report"):
        """A rich Table of the layers and totals."""
        from rich.table import Table

        t = Table(title=title)
        for col in ("layer", "shape", "sparsity", "params", "nonzeros", "dense", "CSR"):
            t.add_column(col, justify="left" if col == "layer" else "right")
        for r in self.layers:
            t.add_row(r.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.sparsity:.2%}", f"{r.params:,}",
                      f"{r.nonzeros:,}", _fmt_bytes(r.dense_bytes), _fmt_bytes(r.csr_bytes))
        t.add_section()
        t.add_row("model total", "", f"{self.total_sparsity:.2%}", f"{self.params:,}",
                  f"{self.nonzero_params:,}", _fmt_bytes(self.dense_bytes), _fmt_bytes(self.compressed_bytes))
        t.caption = f"compression ratio {self.compression_ratio:.2f}x (dense bytes / compressed bytes)"
        return t

    def __str__(self) -> str:
        return (f"CompressionReport({len(self.layers)} layers, sparsity {self.total_sparsity:.2%}, "
                f"{self.nonzero_params:,}/{self.params:,} params, ratio {self.compression_ratio:.2f}x)")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _build_report(model: nn.Module, sparse_rows: dict[str, tuple[nn.Module, int]]) -> CompressionReport:
    """sparse_rows: {name: (module, nonzeros)} of the layers stored (or to be stored) in CSR."""
    model = unwrap_model(model)
    sparse_param_ids: set[int] = set()
    rows: list[LayerReport] = []
    params = nonzero = dense_b = comp_b = 0
    zeros_w = total_w = 0
    for name, (mod, nnz) in sparse_rows.items():
        if isinstance(mod, SparseLinear):
            out_f, in_f = mod.out_features, mod.in_features
            elem = mod.values.element_size()
            sparse_param_ids.add(id(mod.values))
        else:
            out_f, in_f = mod.weight.shape
            elem = mod.weight.element_size()
            sparse_param_ids.add(id(mod.weight))
        numel = out_f * in_f
        db, cb = numel * elem, csr_nbytes(out_f, nnz, elem)
        rows.append(LayerReport(name, (int(out_f), int(in_f)), 1.0 - nnz / numel if numel else 0.0,
                                numel, int(nnz), db, cb))
        params += numel
        nonzero += nnz
        dense_b += db
        comp_b += cb
        zeros_w += numel - nnz
        total_w += numel
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in sparse_param_ids or id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        nonzero += p.numel()
        dense_b += p.numel() * p.element_size()
        comp_b += p.numel() * p.element_size()
    return CompressionReport(
        layers=rows, total_sparsity=zeros_w / total_w if total_w else 0.0, params=params,
        nonzero_params=nonzero, dense_bytes=dense_b, compressed_bytes=comp_b,
        compression_ratio=dense_b / comp_b if comp_b else 1.0)


def _norm_masks(masks) -> dict[str, Tensor] | None:
    if masks is None:
        return None
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict[str, BoolTensor] or None, got {type(masks).__name__}")
    out = {}
    for k, v in masks.items():
        if not isinstance(v, Tensor) or v.dtype != torch.bool:
            raise TypeError(f"masks[{k!r}] must be a bool Tensor, got {getattr(v, 'dtype', type(v).__name__)}")
        out[normalize_name(k)] = v
    return out


def model_sparsity_report(model: nn.Module, masks: dict[str, Tensor] | None = None) -> CompressionReport:
    """The numbers :func:`compress` would report, without converting anything.

    With ``masks`` (e.g. ``GradualPruner.masks``), the layers named in them are accounted as CSR with
    ``mask.sum()`` nonzeros; existing SparseLinear layers are always accounted as CSR; every other
    parameter counts densely. Without masks, nn.Linear layers count densely.
    """
    masks = _norm_masks(masks)
    base = unwrap_model(model)
    rows: dict[str, tuple[nn.Module, int]] = {}
    for name, mod in base.named_modules():
        n = normalize_name(name)
        if isinstance(mod, SparseLinear):
            rows[n] = (mod, mod.nnz)
        elif isinstance(mod, nn.Linear) and masks is not None and n in masks:
            mk = masks[n]
            if tuple(mk.shape) != tuple(mod.weight.shape):
                raise ValueError(f"masks[{n!r}] has shape {tuple(mk.shape)}, weight has {tuple(mod.weight.shape)}")
            rows[n] = (mod, int(mk.sum()))
    if masks is not None:
        missing = set(masks) - set(rows)
        if missing:
            raise ValueError(f"masks name layers that are not nn.Linear in the model: {sorted(missing)}")
    return _build_report(base, rows)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise KeyError("module not found")  # pragma: no cover


@torch.no_grad()
def compress(model: nn.Module, sparsity: float | None = None, method: str = "magnitude", include=None,
             exclude=None, n: int = 2, m: int = 4, block=4, scope: str = "layer",
             masks: dict[str, Tensor] | None = None) -> CompressionReport:
    """Replace the selected nn.Linear layers of ``model`` with :class:`SparseLinear`, in place.

    Layers are selected by fnmatch patterns on their (normalised) names. With ``masks`` (e.g.
    ``GradualPruner.masks``) those masks are used instead of recomputing; if ``include`` is None the
    selection is then exactly the layers named in ``masks``. Without masks, ``sparsity`` is required
    (except for ``method="nm"``, whose sparsity is 1 - n/m). Call on the unwrapped model (before
    wrapping in DDP) -- the layer objects are replaced. Returns the :class:`CompressionReport`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    masks = _norm_masks(masks)
    base = unwrap_model(model)
    check_patterns_match(base, include=include, exclude=exclude)
    if masks is not None and include is None:
        linear = select_linear_layers(base, None, exclude)
        excluded = set(select_linear_layers(base, None, None)) - set(linear)
        missing = sorted(k for k in masks if k not in linear and k not in excluded)
        if missing:
            raise ValueError(f"masks name layers that are not nn.Linear in the model: {missing}")
        layers = {k: linear[k] for k in masks if k in linear}
    else:
        layers = select_linear_layers(base, include, exclude)
    todo = {k: v for k, v in layers.items() if masks is None or k not in masks}
    computed: dict[str, Tensor] = {}
    if todo:
        if sparsity is None and method != "nm":
            raise ValueError("sparsity is required (a float in [0, 1)) unless masks are given or method='nm'")
        computed = compute_masks({k: mod.weight for k, mod in todo.items()}, sparsity or 0.0, method,
                                 scope=scope, n=n, m=m, block=block)
    for k, mod in layers.items():
        mask = masks[k] if masks is not None and k in masks else computed[k]
        if tuple(mask.shape) != tuple(mod.weight.shape):
            raise ValueError(f"mask for {k!r} has shape {tuple(mask.shape)}, weight has {tuple(mod.weight.shape)}")
        sl = SparseLinear.from_dense(mod, mask.to(mod.weight.device))
        sl.train(mod.training)
        _set_submodule(base, _module_path(base, mod), sl)
    return model_sparsity_report(base)
