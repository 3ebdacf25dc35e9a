// Sparse linear layer kernels: y = x W^T + b with W (out x in) in CSR (int32 row pointers and column
// indices), and the weight-values gradient dW_k = sum_n dy[n, row_k] * x[n, col_k] (SDDMM).
//
// This header is shared by the CPU kernels (spmm_cpu.cpp), the torch CUDA glue (spmm_cuda_glue.cpp) and
// the plain-CUDA kernels (spmm_cuda.cu). It must not include torch or CUDA headers.
#pragma once

#include <cstdint>

namespace raydistill {
namespace sparse {

// Element types the CUDA launchers accept (math is fp32, or fp64 for kF64).
enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

// ---- CUDA launchers (defined in spmm_cuda.cu); pointers are device pointers, stream a cudaStream_t ----

// y[n, r] = sum_{k in row r} values[k] * x[n, col[k]] + bias[r]   (x: n_batch x in_f, y: n_batch x out_f,
// both row-major contiguous). row_order: a permutation of [0, out_f) with rows sorted by decreasing nnz
// (load balance) or null for the natural order; bias may be null. Returns 0 or a cudaError_t code.
// The kernels never read outside the pattern's nnz entries or x's in_f rows: a row range is clamped to
// [0, nnz) and a column outside [0, in_f) is skipped (the host cannot check a device pattern without a
// sync; the CPU ops and the layers' load-time checks raise on such a pattern instead).
int spmm_cuda_launch(DType dtype, const void* x, const int32_t* crow, const int32_t* col, const void* values,
                     const void* bias, const int32_t* row_order, void* y, int64_t n_batch, int64_t in_f,
                     int64_t out_f, int64_t nnz, void* stream);

// xT (feat, n_pad) = x (n_batch, feat)^T, zero-padded to n_pad = round_up(n_batch, 8) columns: the layout
// both launchers take (one kernel instead of a fill and a strided copy).
int transpose_pad_cuda_launch(DType dtype, const void* x, void* xT, int64_t n_batch, int64_t feat, void* stream);

// dvalues[k] = sum_n dy[n, row_k] * x[n, col_k] for k in [0, nnz); dvalues has the element type dtype.
int sddmm_cuda_launch(DType dtype, const void* dy, const void* x, const int32_t* crow, const int32_t* col,
                      const int32_t* row_order, void* dvalues, int64_t n_batch, int64_t in_f, int64_t out_f,
                      int64_t nnz, void* stream);

}  // namespace sparse
}  // namespace raydistill
