"""Compression toolkit: pruning masks, gradual pruning, conversion to SparseLinear, size reports,
sparse checkpoints.

Public API (a contract for the distillation pipeline):

* masks: :func:`magnitude_mask`, :func:`global_magnitude_masks`, :func:`nm_mask`, :func:`block_mask`
* schedule: :func:`cubic_sparsity`; training: :class:`GradualPruner`
* conversion: :func:`compress` -> :class:`CompressionReport`; :func:`model_sparsity_report`
* checkpoints: :func:`save_sparse`, :func:`load_sparse`; compressed (quantized / structured / sparse):
  :func:`save_compressed`, :func:`load_compressed`; the compressed-tensors layout (vLLM) of a quantized
  transformers LM: :func:`export_compressed_tensors`
* quantization: :func:`quantize` (PTQ, and the conversion after QAT), :func:`prepare_qat`,
  :class:`QuantizedLinear`, :class:`FakeQuantLinear`
* structured pruning: :func:`prune_structured`, :func:`resize_structured`; to a target shape (layers, hidden
  size, heads, KV heads, intermediate size; the Minitron recipe): :func:`prune_to_shape` -> :class:`ShapeReport`,
  :func:`make_student_from_teacher`, :func:`student_target`, :func:`shape_for_params` (the width for a
  parameter count at a depth), :func:`config_params`
"""

from raydistill.compress.checkpoint import load_sparse, save_sparse
from raydistill.compress.convert import CompressionReport, LayerReport, compress, csr_nbytes, model_sparsity_report
from raydistill.compress.masks import block_mask, global_magnitude_masks, magnitude_mask, nm_mask
from raydistill.compress.pruner import GradualPruner, compute_masks, normalize_name, select_linear_layers
from raydistill.compress.schedule import cubic_sparsity
from raydistill.compress.export import export_compressed_tensors, load_compressed, save_compressed
from raydistill.compress.quantize import (FakeQuantLinear, QuantizationReport, QuantizedLinear, prepare_qat,
                                          quantize)
from raydistill.compress.structured import StructuredReport, resize_structured
from raydistill.compress.prune_shape import (ShapeReport, config_params, make_student_from_teacher, prune_structured,
                                             prune_to_shape, shape_for_params, student_target)

__all__ = [
    "magnitude_mask", "global_magnitude_masks", "nm_mask", "block_mask", "compute_masks",
    "cubic_sparsity", "GradualPruner", "compress", "model_sparsity_report", "CompressionReport",
    "LayerReport", "csr_nbytes", "save_sparse", "load_sparse", "normalize_name", "select_linear_layers",
    "quantize", "prepare_qat", "QuantizedLinear", "FakeQuantLinear", "QuantizationReport", "prune_structured",
    "resize_structured", "StructuredReport", "save_compressed", "load_compressed", "export_compressed_tensors",
    "prune_to_shape", "ShapeReport", "make_student_from_teacher", "student_target", "shape_for_params",
    "config_params",
]
