// CUDA kernel of the int8 sparse linear op (raydistill::spmm_int8): plain CUDA C++ (no torch headers)
// behind a C++ launcher (spmm_int8.h); the torch glue is spmm_int8_cuda_glue.cpp.
//
//   y[n, r] = scales[r] * sum_{k in row r} values[k] * x[n, col[k]] + bias[r]
//
// A warp owns one row of W and a chunk of NB batch rows: its lanes stride over the row's nonzeros
// (coalesced int8 values and uint16/int32 column indices, each read once per chunk), every lane keeps
// NB fp32 partial sums (fp64 for double x), a shuffle reduction combines them and lane b writes y[n0+b, r].
// x is read in place (row-major); the gathers x[n, col] hit L1/L2 since a chunk revisits the same rows.
// A first, simple kernel: compile-checked (make check-cuda), not yet measured on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sparse/spmm_int8.h"

namespace raydistill {
namespace sparse {
namespace {

constexpr int kI8WarpsPerBlock = 4;
constexpr int kI8Batch = 8;  // batch rows per warp (NB)

template <typename T> struct I8X;
template <> struct I8X<float> {
  using acc = float;
  __device__ static float load(const float* p) { return __ldg(p); }
  __device__ static float store(float v) { return v; }
};
template <> struct I8X<double> {
  using acc = double;
  __device__ static double load(const double* p) { return __ldg(p); }
  __device__ static double store(double v) { return v; }
};
template <> struct I8X<__nv_bfloat16> {
  using acc = float;
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16(v); }
};
template <> struct I8X<__half> {
  using acc = float;
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static __half store(float v) { return __float2half(v); }
};

template <typename scalar_t, typename idx_t>
__global__ void __launch_bounds__(32 * kI8WarpsPerBlock)
    spmm_int8_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ crow, const idx_t* __restrict__ col,
                     const int8_t* __restrict__ values, const float* __restrict__ scales,
                     const float* __restrict__ bias, scalar_t* __restrict__ y, int64_t n_batch, int64_t in_f,
                     int64_t out_f, int64_t nnz) {
  using acc_t = typename I8X<scalar_t>::acc;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kI8WarpsPerBlock + (threadIdx.x >> 5);
  if (r >= out_f) return;  // whole warps exit together
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kI8Batch;
  const int nb = static_cast<int>(n_batch - n0 < kI8Batch ? n_batch - n0 : kI8Batch);
  acc_t acc[kI8Batch];
#pragma unroll
  for (int b = 0; b < kI8Batch; ++b) acc[b] = acc_t(0);
  // never outside (see spmm_int8.h): the row's range clamped to [0, nnz), columns outside [0, in_f) skipped
  const int64_t k0 = max(static_cast<int64_t>(crow[r]), int64_t(0)), k1 = min(static_cast<int64_t>(crow[r + 1]), nnz);
  const scalar_t* xb = x + n0 * in_f;
  for (int64_t k = k0 + lane; k < k1; k += 32) {
    const int64_t c = static_cast<int64_t>(col[k]);
    if (c < 0 || c >= in_f) continue;
    const acc_t v = static_cast<acc_t>(values[k]);
#pragma unroll
    for (int b = 0; b < kI8Batch; ++b)
      if (b < nb) acc[b] += v * I8X<scalar_t>::load(xb + b * in_f + c);
  }
  const acc_t s = static_cast<acc_t>(scales[r]);
  const acc_t bi = bias ? static_cast<acc_t>(bias[r]) : acc_t(0);
#pragma unroll
  for (int b = 0; b < kI8Batch; ++b) {
    acc_t t = acc[b];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
    if (lane == b && b < nb) y[(n0 + b) * out_f + r] = I8X<scalar_t>::store(t * s + bi);
  }
}

template <typename scalar_t, typename idx_t>
int launch(const void* x, const int32_t* crow, const void* col, const int8_t* values, const float* scales,
           const float* bias, void* y, int64_t n_batch, int64_t in_f, int64_t out_f, int64_t nnz, cudaStream_t stream) {
  const dim3 block(32 * kI8WarpsPerBlock);
  const int64_t gx = (out_f + kI8WarpsPerBlock - 1) / kI8WarpsPerBlock, gy = (n_batch + kI8Batch - 1) / kI8Batch;
  if (gx > 2147483647LL || gy > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  spmm_int8_kernel<scalar_t, idx_t><<<grid, block, 0, stream>>>(
      static_cast<const scalar_t*>(x), crow, static_cast<const idx_t*>(col), values, scales, bias,
      static_cast<scalar_t*>(y), n_batch, in_f, out_f, nnz);
  return static_cast<int>(cudaGetLastError());
}

template <typename scalar_t>
int launch_idx(int col_bytes, const void* x, const int32_t* crow, const void* col, const int8_t* values,
               const float* scales, const float* bias, void* y, int64_t n_batch, int64_t in_f, int64_t out_f,
               int64_t nnz, cudaStream_t stream) {
  if (col_bytes == 2)
    return launch<scalar_t, uint16_t>(x, crow, col, values, scales, bias, y, n_batch, in_f, out_f, nnz, stream);
  if (col_bytes == 4)
    return launch<scalar_t, int32_t>(x, crow, col, values, scales, bias, y, n_batch, in_f, out_f, nnz, stream);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int spmm_int8_cuda_launch(Int8XType dtype, const void* x, const int32_t* crow, const void* col, int col_bytes,
                          const int8_t* values, const float* scales, const float* bias, void* y, int64_t n_batch,
                          int64_t in_f, int64_t out_f, int64_t nnz, void* stream) {
  if (n_batch == 0 || out_f == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Int8XType::kF32:
      return launch_idx<float>(col_bytes, x, crow, col, values, scales, bias, y, n_batch, in_f, out_f, nnz, s);
    case Int8XType::kF64:
      return launch_idx<double>(col_bytes, x, crow, col, values, scales, bias, y, n_batch, in_f, out_f, nnz, s);
    case Int8XType::kBF16:
      return launch_idx<__nv_bfloat16>(col_bytes, x, crow, col, values, scales, bias, y, n_batch, in_f, out_f, nnz, s);
    case Int8XType::kF16:
      return launch_idx<__half>(col_bytes, x, crow, col, values, scales, bias, y, n_batch, in_f, out_f, nnz, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace sparse
}  // namespace raydistill
