// Torch-facing CUDA glue of kd_loss: argument checks, dtype/stride/alignment bookkeeping, output
// allocation, and the call of the plain-CUDA launcher (kd_loss_cuda.cu) on the current stream.
// Compiled only when torch has CUDA (see raydistill/_build.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "kd_loss/kd_loss.h"
#include "kd_loss/kd_loss_checks.h"
#include "kd_loss/kd_loss_cuda.h"

namespace raydistill {
namespace kd {
namespace {

int io_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK_TYPE(false, "kd_loss: unsupported dtype ", t); return -1;
  }
}

bool aligned16(const at::Tensor& t, int64_t row_stride) {
  if (t.numel() == 0) return true;
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 &&
         (row_stride * static_cast<int64_t>(t.element_size())) % 16 == 0;
}

std::tuple<at::Tensor, at::Tensor> run_cuda(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                            const at::Tensor* indices_in, const std::optional<at::Tensor>& labels,
                                            double temperature, double alpha, int64_t divergence, double beta,
                                            int64_t ignore_index, bool t2_scaling, bool compute_grad,
                                            const std::optional<at::Tensor>& scale_in,
                                            const std::optional<at::Tensor>& tail_in = std::nullopt) {
  check_scalars(temperature, alpha, divergence, beta);
  const bool topk = indices_in != nullptr;
  TORCH_CHECK_VALUE(!topk || divergence != kReverseKL,
                    "kd_loss_topk: divergence reverse_kl is not supported with a top-k teacher");
  check_logits(student_in, "student_logits");
  check_logits(teacher_in, topk ? "teacher_topk_logits" : "teacher_logits");
  TORCH_CHECK_VALUE(teacher_in.device() == student_in.device(), "kd_loss: teacher must be on ",
                    student_in.device(), ", got ", teacher_in.device());
  const int64_t rows = student_in.size(0), V = student_in.size(1);
  TORCH_CHECK_VALUE(V >= 1, "kd_loss: the vocabulary dimension must be >= 1");
  if (topk) {
    TORCH_CHECK_VALUE(teacher_in.size(0) == rows && teacher_in.size(1) >= 1,
                      "kd_loss_topk: teacher_topk_logits must have shape (", rows, ", k>=1), got ",
                      teacher_in.sizes());
    TORCH_CHECK_TYPE(indices_in->scalar_type() == at::kLong || indices_in->scalar_type() == at::kInt,
                     "kd_loss_topk: teacher_topk_indices must be int64 or int32, got ", indices_in->scalar_type());
    TORCH_CHECK_VALUE(indices_in->sizes() == teacher_in.sizes(), "kd_loss_topk: teacher_topk_indices shape ",
                      indices_in->sizes(), " must match teacher_topk_logits shape ", teacher_in.sizes());
    TORCH_CHECK_VALUE(indices_in->device() == student_in.device(), "kd_loss_topk: teacher_topk_indices must be on ",
                      student_in.device());
  } else {
    TORCH_CHECK_VALUE(student_in.sizes() == teacher_in.sizes(), "kd_loss: teacher_logits shape ",
                      teacher_in.sizes(), " must match student_logits shape ", student_in.sizes());
  }
  const c10::cuda::CUDAGuard guard(student_in.device());
  at::Tensor lab = prepare_labels(labels, rows, alpha, student_in.device());
  const at::Tensor scale = prepare_scale(scale_in, student_in.device());

  const bool dbl = student_in.scalar_type() == at::kDouble || teacher_in.scalar_type() == at::kDouble;
  // a tail > 0 or NaN is not checked here (that would sync with the device): the row's loss comes out NaN
  const at::Tensor tail = prepare_tail(tail_in, rows, student_in.device(), dbl ? at::kDouble : at::kFloat);
  TORCH_CHECK_VALUE(topk || !tail.defined(), "kd_loss: a tail is only defined for a top-k teacher");
  at::Tensor student = unit_last_stride(dbl ? student_in.to(at::kDouble) : student_in);
  at::Tensor teacher = dbl ? teacher_in.to(at::kDouble) : teacher_in;
  teacher = topk ? teacher.contiguous() : unit_last_stride(teacher);
  at::Tensor idx = topk ? indices_in->to(at::kLong).contiguous() : at::Tensor();

  at::Tensor loss = at::empty({rows}, student_in.options().dtype(dbl ? at::kDouble : at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({rows, V}, student.options()) : at::empty({0}, student_in.options());
  if (rows > 0) {
    KDLaunchArgs a{};
    a.student = student.data_ptr();
    a.teacher = teacher.data_ptr();
    a.labels = lab.defined() ? lab.data_ptr<int64_t>() : nullptr;
    a.topk_indices = topk ? idx.data_ptr<int64_t>() : nullptr;
    a.loss = loss.data_ptr();
    a.grad = compute_grad ? grad.data_ptr() : nullptr;
    a.rows = rows;
    a.V = V;
    a.k = topk ? teacher.size(1) : 0;
    a.student_row_stride = row_stride(student);
    a.teacher_row_stride = topk ? teacher.size(1) : row_stride(teacher);
    a.student_dtype = io_dtype(student.scalar_type());
    a.teacher_dtype = io_dtype(teacher.scalar_type());
    a.student_aligned = aligned16(student, a.student_row_stride);
    a.teacher_aligned = !topk && aligned16(teacher, a.teacher_row_stride);
    a.grad_aligned = compute_grad && aligned16(grad, V);
    a.scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
    a.tail = tail.defined() ? tail.data_ptr() : nullptr;
    a.p = make_params(temperature, alpha, divergence, beta, ignore_index, t2_scaling, lab.defined(), compute_grad);
    const cudaError_t err = kd_loss_cuda_launch(a, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "kd_loss: CUDA kernel launch failed: ", cudaGetErrorString(err),
                tail.defined() ? " (a top-k teacher with a tail needs V / 8 bytes of shared memory per row)" : "");
  }
  if (compute_grad && grad.scalar_type() != student_in.scalar_type()) grad = grad.to(student_in.scalar_type());
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels, double temperature,
                                                    double alpha, int64_t divergence, double beta,
                                                    int64_t ignore_index, bool t2_scaling, bool compute_grad,
                                                    const std::optional<at::Tensor>& scale) {
  return run_cuda(student, teacher, nullptr, labels, temperature, alpha, divergence, beta, ignore_index,
                  t2_scaling, compute_grad, scale);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher_topk,
                                                         const at::Tensor& indices,
                                                         const std::optional<at::Tensor>& labels,
                                                         double temperature, double alpha, int64_t divergence,
                                                         double beta, int64_t ignore_index, bool t2_scaling,
                                                         bool compute_grad, const std::optional<at::Tensor>& scale,
                                                         const std::optional<at::Tensor>& tail) {
  return run_cuda(student, teacher_topk, &indices, labels, temperature, alpha, divergence, beta, ignore_index,
                  t2_scaling, compute_grad, scale, tail);
}

}  // namespace
}  // namespace kd
}  // namespace raydistill

TORCH_LIBRARY_IMPL(raydistill, CUDA, m) {
  m.impl("kd_loss_fwd", &raydistill::kd::kd_loss_fwd_cuda);
  m.impl("kd_loss_topk_fwd", &raydistill::kd::kd_loss_topk_fwd_cuda);
}
