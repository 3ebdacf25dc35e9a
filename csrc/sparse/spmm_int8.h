// The int8 sparse linear op's CUDA launcher (defined in spmm_int8_cuda.cu, called by spmm_int8_cuda_glue.cpp):
//
//   y[n, r] = scales[r] * sum_{k in row r} values[k] * x[n, col[k]] + bias[r]
//
// x (n_batch x in_f) and y (n_batch x out_f) row-major contiguous, element type `dtype`; values int8;
// scales and bias fp32 (bias may be null); col uint16 (col_bytes == 2) or int32 (col_bytes == 4).
// Math is fp32 (fp64 for kF64). The kernel never reads outside the pattern's nnz entries or x's rows: a row
// range is clamped to [0, nnz) and a column outside [0, in_f) is skipped (the host cannot check a device
// pattern without a sync; the CPU op and the layers' load-time checks raise on such a pattern instead).
// Must not include torch or CUDA headers.
#pragma once

#include <cstdint>

namespace raydistill {
namespace sparse {

enum class Int8XType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

// Returns 0 or a cudaError_t code. stream is a cudaStream_t.
int spmm_int8_cuda_launch(Int8XType dtype, const void* x, const int32_t* crow, const void* col, int col_bytes,
                          const int8_t* values, const float* scales, const float* bias, void* y, int64_t n_batch,
                          int64_t in_f, int64_t out_f, int64_t nnz, void* stream);

}  // namespace sparse
}  // namespace raydistill
