// The CPU pieces of the int8 sparse linear ops that both CPU files use (spmm_int8_cpu.cpp defines them;
// spmm_int8_a16_cpu.cpp calls them). CPU-only: includes ATen, not CUDA.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace raydistill {
namespace sparse {

// The argument rules of raydistill::spmm_int8 / spmm_int8_a16 (shapes, dtypes, devices), with errors naming
// the argument. Also used by the CUDA glue.
void check_spmm_int8_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                          int64_t out_features);

// raydistill::spmm_int8 on CPU (inputs as they are, fp32 math).
at::Tensor spmm_int8_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                         const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t out_features);

// The CSR column indices (uint16 when in_f <= 65536, else int32) of a uint8 row bitmap, checked against crow.
at::Tensor decode_bitmap_columns(const uint8_t* bm, const int32_t* crow, int64_t out_f, int64_t in_f);

}  // namespace sparse
}  // namespace raydistill
