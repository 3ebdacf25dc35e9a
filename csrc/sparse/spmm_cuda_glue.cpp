// Torch-facing CUDA glue of the sparse linear ops: checks (metadata only: no device sync), layout (x^T
// padded to a multiple of 8 batch columns, one kernel), stream, and the launchers in spmm_cuda.cu.
// Per call: one allocation for x^T, one transpose kernel, one SpMM kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sparse/spmm.h"

namespace raydistill {
namespace sparse {

// defined in spmm_cpu.cpp (one place for argument checks)
void check_spmm_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                     const std::optional<at::Tensor>& bias, int64_t out_features);
void check_sddmm_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col);

namespace {

DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return DType::kF32;
    case at::kBFloat16: return DType::kBF16;
    case at::kHalf: return DType::kF16;
    case at::kDouble: return DType::kF64;
    default: TORCH_CHECK_TYPE(false, "raydistill sparse ops: unsupported dtype ", st);
  }
  return DType::kF32;
}

// (N, F) -> (F, round_up(N, 8)) zero-padded, contiguous
at::Tensor transpose_pad(const at::Tensor& a_) {
  const at::Tensor a = a_.contiguous();
  const int64_t n = a.size(0), np = (n + 7) / 8 * 8;
  at::Tensor t = at::empty({a.size(1), np}, a.options());
  const int err = transpose_pad_cuda_launch(to_dtype(a.scalar_type()), a.data_ptr(), t.data_ptr(), n, a.size(1),
                                            c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "raydistill sparse ops: transpose launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return t;
}

at::Tensor spmm_cuda(const at::Tensor& x_, const at::Tensor& crow_, const at::Tensor& col_, const at::Tensor& values_,
                     const std::optional<at::Tensor>& bias_, int64_t out_features, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  check_spmm_args(x_, crow_, col_, values_, bias_, out_features);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor crow = crow_.contiguous(), col = col_.contiguous(), values = values_.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_.has_value()) bias = bias_->contiguous();
  const int64_t n = x_.size(0), in_f = x_.size(1);
  at::Tensor y = at::empty({n, out_features}, x_.options());
  if (n == 0 || out_features == 0) return y;
  if (in_f == 0) {  // no inputs: y = bias (the kernel needs at least one column of x^T)
    if (bias) y.copy_(bias->unsqueeze(0).expand({n, out_features})); else y.zero_();
    return y;
  }
  const at::Tensor xT = transpose_pad(x_);
  const int err = spmm_cuda_launch(to_dtype(x_.scalar_type()), xT.data_ptr(), crow.data_ptr<int32_t>(),
                                   col.data_ptr<int32_t>(), values.data_ptr(), bias ? bias->data_ptr() : nullptr,
                                   nullptr, y.data_ptr(), n, in_f, out_features, col.numel(),
                                   c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "raydistill::spmm CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return y;
}

at::Tensor sddmm_cuda(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& crow_, const at::Tensor& col_) {
  check_sddmm_args(dy_, x_, crow_, col_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor crow = crow_.contiguous(), col = col_.contiguous();
  const int64_t n = x_.size(0), in_f = x_.size(1), out_f = dy_.size(1);
  at::Tensor out = at::empty({col.numel()}, x_.options());
  if (col.numel() == 0 || out_f == 0) return out;
  const at::Tensor xT = transpose_pad(x_), dyT = transpose_pad(dy_);
  const int err = sddmm_cuda_launch(to_dtype(x_.scalar_type()), dyT.data_ptr(), xT.data_ptr(),
                                    crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), nullptr, out.data_ptr(), n,
                                    in_f, out_f, col.numel(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "raydistill::sddmm CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

}  // namespace
}  // namespace sparse
}  // namespace raydistill

TORCH_LIBRARY_IMPL(raydistill, CUDA, m) {
  m.impl("spmm", &raydistill::sparse::spmm_cuda);
  m.impl("sddmm", &raydistill::sparse::sddmm_cuda);
}
