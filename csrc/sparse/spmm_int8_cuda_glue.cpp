// Torch-facing CUDA glue of raydistill::spmm_int8: argument checks (shared with the CPU kernel), device
// guard, stream, and the launcher in spmm_int8_cuda.cu. Compiled only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "sparse/spmm_int8.h"

namespace raydistill {
namespace sparse {

// defined in spmm_int8_cpu.cpp (one place for the argument rules)
void check_spmm_int8_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                          int64_t out_features);

namespace {

Int8XType int8_x_type(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return Int8XType::kF32;
    case at::kBFloat16: return Int8XType::kBF16;
    case at::kHalf: return Int8XType::kF16;
    case at::kDouble: return Int8XType::kF64;
    default: TORCH_CHECK_TYPE(false, "spmm_int8: unsupported x dtype ", st);
  }
  return Int8XType::kF32;
}

at::Tensor spmm_int8_cuda(const at::Tensor& x_, const at::Tensor& crow_, const at::Tensor& col_,
                          const at::Tensor& values_, const at::Tensor& scales_, const std::optional<at::Tensor>& bias_,
                          int64_t out_features) {
  check_spmm_int8_args(x_, crow_, col_, values_, scales_, bias_, out_features);
  TORCH_CHECK_VALUE(col_.scalar_type() != at::kByte,
                    "spmm_int8: the uint8 row-bitmap col_indices layout has no CUDA kernel; use CSR column indices "
                    "(SparseLinear.quantize(bits=8, index='csr'))");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), crow = crow_.contiguous(), col = col_.contiguous(),
                   values = values_.contiguous(), scales = scales_.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_.has_value()) bias = bias_->contiguous();
  const int64_t n = x.size(0), in_f = x.size(1);
  at::Tensor y = at::empty({n, out_features}, x.options());
  if (n == 0 || out_features == 0) return y;
  const int col_bytes = col.scalar_type() == at::kUInt16 ? 2 : 4;
  const int err = spmm_int8_cuda_launch(int8_x_type(x.scalar_type()), x.data_ptr(), crow.data_ptr<int32_t>(),
                                        col.data_ptr(), col_bytes, values.data_ptr<int8_t>(), scales.data_ptr<float>(),
                                        bias ? bias->data_ptr<float>() : nullptr, y.data_ptr(), n, in_f, out_features,
                                        values.numel(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "raydistill::spmm_int8 CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return y;
}

}  // namespace
}  // namespace sparse
}  // namespace raydistill

TORCH_LIBRARY_IMPL(raydistill, CUDA, m) { m.impl("spmm_int8", &raydistill::sparse::spmm_int8_cuda); }
