// Torch-facing argument checks shared by the CPU op and the CUDA glue of kd_loss.
//
// The Python wrapper (raydistill/ops/kd_loss.py) validates everything first with friendlier messages;
// these checks guard direct calls of torch.ops.raydistill.* and the compiled (torch.compile) path,
// where data-dependent Python checks are skipped. Value errors map to Python ValueError.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "kd_loss/kd_loss.h"

namespace raydistill {
namespace kd {

inline bool is_io_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_scalars(double temperature, double alpha, int64_t divergence, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "kd_loss: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "kd_loss: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(divergence >= kForwardKL && divergence <= kJSD,
                    "kd_loss: divergence code must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ",
                    divergence);
  TORCH_CHECK_VALUE(divergence != kJSD || (beta > 0 && beta < 1),
                    "kd_loss: beta must be in (0, 1) for divergence jsd, got ", beta);
}

inline void check_logits(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_io_float(t.scalar_type()), "kd_loss: ", name,
                   " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, "kd_loss: ", name, " must be 2-D (rows, V) here, got ", t.dim(), "-D");
}

// labels: optional 1-D integer tensor of length rows. Returns an int64 contiguous tensor (or undefined).
inline at::Tensor prepare_labels(const std::optional<at::Tensor>& labels, int64_t rows, double alpha,
                                 const at::Device& dev) {
  if (!labels.has_value() || !labels->defined()) {
    TORCH_CHECK_VALUE(alpha == 1.0, "kd_loss: labels are required when alpha < 1 (got alpha=", alpha, ")");
    return at::Tensor();
  }
  const at::Tensor& l = *labels;
  TORCH_CHECK_TYPE(l.scalar_type() == at::kLong || l.scalar_type() == at::kInt,
                   "kd_loss: labels must be int64 or int32, got ", l.scalar_type());
  TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == rows, "kd_loss: labels must have shape (", rows,
                    ",), got ", l.sizes());
  TORCH_CHECK_VALUE(l.device() == dev, "kd_loss: labels must be on ", dev, ", got ", l.device());
  return l.to(at::kLong).contiguous();
}

// Optional one-element tensor multiplying every row loss and gradient: the Python wrapper passes
// 1 / (number of valid rows) for reduction="mean", so the gradient comes out final and backward has
// nothing to scale when the upstream gradient is 1. Returns a float32 contiguous tensor or undefined.
inline at::Tensor prepare_scale(const std::optional<at::Tensor>& scale, const at::Device& dev) {
  if (!scale.has_value() || !scale->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(scale->numel() == 1, "kd_loss: scale must have exactly one element, got ", scale->numel());
  TORCH_CHECK_VALUE(scale->device() == dev, "kd_loss: scale must be on ", dev, ", got ", scale->device());
  TORCH_CHECK_TYPE(scale->is_floating_point(), "kd_loss: scale must be a floating-point tensor, got ",
                   scale->scalar_type());
  return scale->to(at::kFloat).contiguous();
}

// teacher_topk_tail: optional 1-D float tensor of length rows, log of the teacher's probability mass outside
// its top-k entries (<= 0; -inf: none). Returns a contiguous tensor of `acc` (float32, or float64 for float64
// inputs), or undefined.
inline at::Tensor prepare_tail(const std::optional<at::Tensor>& tail, int64_t rows, const at::Device& dev,
                               at::ScalarType acc) {
  if (!tail.has_value() || !tail->defined()) return at::Tensor();
  const at::Tensor& t = *tail;
  TORCH_CHECK_TYPE(is_io_float(t.scalar_type()), "kd_loss_topk: teacher_topk_tail must be float32, bfloat16, "
                   "float16 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, "kd_loss_topk: teacher_topk_tail must have shape (", rows,
                    ",) (one value per row), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == dev, "kd_loss_topk: teacher_topk_tail must be on ", dev, ", got ", t.device());
  return t.to(acc).contiguous();
}

// Folds a host-side scale into the parameters (the CPU kernels: the scale tensor lives on the host).
inline void fold_scale(KDParams& p, const at::Tensor& scale) {
  if (!scale.defined()) return;
  const double s = scale.item<double>();
  p.coef *= s;
  p.ce_weight *= s;
}

// A (rows, V) view with unit stride in V, copying only when the last dimension is strided.
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  // Any row stride (even 0, an expanded teacher) is fine for reading.
  if (t.size(1) <= 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}

inline int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

}  // namespace kd
}  // namespace raydistill
