// CUDA kernels of the sparse linear ops: plain CUDA C++ (no torch headers) behind C++ launchers.
//
// The glue passes x^T (and dy^T) as (features, NP) row-major with the batch padded to NP, a multiple
// of 8, so that every lane does 16-byte vector loads of a contiguous batch slice. A warp owns one row
// of W (rows visited longest first via row_order, for load balance); its 32 lanes are split into
// KL sub-warps of BL lanes: the BL lanes of a sub-warp cover a slice of the batch with vector loads,
// the KL sub-warps take every KL-th nonzero of the row, and a shuffle reduction combines them. The
// math is fp32 (fp64 for double).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "sparse/spmm.h"

namespace raydistill {
namespace sparse {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T> struct Vec;  // V elements = 16 bytes
template <> struct Vec<float> {
  static constexpr int V = 4;
  using acc = float;
  __device__ static void load(const float* p, float* o) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
  }
  __device__ static float cvt(float v) { return v; }
  __device__ static float from(float v) { return v; }
};
template <> struct Vec<double> {
  static constexpr int V = 2;
  using acc = double;
  __device__ static void load(const double* p, double* o) {
    const double2 v = *reinterpret_cast<const double2*>(p);
    o[0] = v.x; o[1] = v.y;
  }
  __device__ static double cvt(double v) { return v; }
  __device__ static double from(double v) { return v; }
};
template <> struct Vec<__nv_bfloat16> {
  static constexpr int V = 8;
  using acc = float;
  __device__ static void load(const __nv_bfloat16* p, float* o) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      o[2 * i] = f.x; o[2 * i + 1] = f.y;
    }
  }
  __device__ static float cvt(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16(v); }
};
template <> struct Vec<__half> {
  static constexpr int V = 8;
  using acc = float;
  __device__ static void load(const __half* p, float* o) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      o[2 * i] = f.x; o[2 * i + 1] = f.y;
    }
  }
  __device__ static float cvt(__half v) { return __half2float(v); }
  __device__ static __half from(float v) { return __float2half(v); }
};

// y[n, r] = sum_k values[k] * xT[col[k], n] + bias[r]; xT is (in_f, np) row-major, y is (n_batch, out_f).
template <typename T, int BL>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
spmm_kernel(const T* __restrict__ xT, const int32_t* __restrict__ crow, const int32_t* __restrict__ col,
            const T* __restrict__ values, const T* __restrict__ bias, const int32_t* __restrict__ row_order,
            T* __restrict__ y, int64_t n_batch, int64_t np, int64_t out_f, int32_t in_f, int32_t nnz) {
  using VT = Vec<T>;
  using acc_t = typename VT::acc;
  constexpr int V = VT::V;
  constexpr int KL = 32 / BL;
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (w >= out_f) return;
  const int32_t r = row_order ? row_order[w] : static_cast<int32_t>(w);
  const int bl = lane % BL, kl = lane / BL;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.y) * BL + bl) * V;  // first batch element of this lane
  const bool active = n0 < np;
  acc_t acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = acc_t(0);
  // a malformed pattern never reads outside: the row's range is clamped to [0, nnz) and a column outside
  // [0, in_f) counts as a zero weight at column 0 (see spmm.h; in_f >= 1 here)
  const int32_t k0 = max(__ldg(crow + r), 0), k1 = min(__ldg(crow + r + 1), nnz);
  if (active) {
    int32_t k = k0 + kl;
    // 4 nonzeros per step: their column indices, values and x vectors are all in flight at once (the
    // gathers of x are L2 latency-bound; one at a time left the kernel at ~12% of DRAM bandwidth)
    for (; k + 3 * KL < k1; k += 4 * KL) {
      int32_t c[4];
      acc_t v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        c[u] = __ldg(col + k + u * KL);
        v[u] = VT::cvt(values[k + u * KL]);
        if (static_cast<uint32_t>(c[u]) >= static_cast<uint32_t>(in_f)) { c[u] = 0; v[u] = acc_t(0); }
      }
      acc_t xv[4][V];
#pragma unroll
      for (int u = 0; u < 4; ++u) VT::load(xT + static_cast<int64_t>(c[u]) * np + n0, xv[u]);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += v[u] * xv[u][j];
      }
    }
    for (; k < k1; k += KL) {
      int32_t c = __ldg(col + k);
      acc_t v = VT::cvt(values[k]);
      if (static_cast<uint32_t>(c) >= static_cast<uint32_t>(in_f)) { c = 0; v = acc_t(0); }
      acc_t xv[V];
      VT::load(xT + static_cast<int64_t>(c) * np + n0, xv);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += v * xv[j];
    }
  }
#pragma unroll
  for (int off = BL; off < 32; off <<= 1) {
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
  }
  if (kl == 0 && active) {
    const acc_t b = bias ? VT::cvt(bias[r]) : acc_t(0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (n0 + j < n_batch) y[(n0 + j) * out_f + r] = VT::from(acc[j] + b);
    }
  }
}

// dvalues[k] = sum_n dyT[row_k, n] * xT[col_k, n]; dyT (out_f, np), xT (in_f, np), padding is zero.
template <typename T, int BL>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
sddmm_kernel(const T* __restrict__ dyT, const T* __restrict__ xT, const int32_t* __restrict__ crow,
             const int32_t* __restrict__ col, const int32_t* __restrict__ row_order, T* __restrict__ dvalues,
             int64_t np, int64_t out_f, int32_t in_f, int32_t nnz) {
  using VT = Vec<T>;
  using acc_t = typename VT::acc;
  constexpr int V = VT::V;
  constexpr int KL = 32 / BL;
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (w >= out_f) return;
  const int32_t r = row_order ? row_order[w] : static_cast<int32_t>(w);
  const int bl = lane % BL, kl = lane / BL;
  const int32_t k0 = max(crow[r], 0), k1 = min(crow[r + 1], nnz);  // never outside (see spmm.h)
  const T* d = dyT + static_cast<int64_t>(r) * np;
  // every sub-warp walks its nonzeros in lockstep (same trip count) so the shuffles see all lanes
  const int32_t len = max(k1 - k0, 0);
  const int32_t trips = (len + KL - 1) / KL;
  for (int32_t it = 0; it < trips; ++it) {
    const int32_t k = k0 + it * KL + kl;
    const bool has = k < k1;
    acc_t s = acc_t(0);
    const int32_t c = has ? col[k] : 0;
    if (has && static_cast<uint32_t>(c) < static_cast<uint32_t>(in_f)) {
      const T* xr = xT + static_cast<int64_t>(c) * np;
      for (int64_t n0 = static_cast<int64_t>(bl) * V; n0 < np; n0 += static_cast<int64_t>(BL) * V) {
        acc_t a[V], b[V];
        VT::load(d + n0, a);
        VT::load(xr + n0, b);
#pragma unroll
        for (int j = 0; j < V; ++j) s += a[j] * b[j];
      }
    }
#pragma unroll
    for (int off = 1; off < BL; off <<= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (has && bl == 0) dvalues[k] = VT::from(s);
  }
}

// xT[f, n] = x[n, f] for n < n_batch, 0 for n_batch <= n < np: 32 x 32 tiles through shared memory
// (coalesced reads of x rows and writes of xT rows).
template <typename T>
__global__ void __launch_bounds__(256) transpose_pad_kernel(const T* __restrict__ x, T* __restrict__ xT,
                                                            int64_t n_batch, int64_t feat, int64_t np) {
  __shared__ T tile[32][33];
  const int64_t f0 = static_cast<int64_t>(blockIdx.x) * 32, n0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;  // 32 x 8 threads
#pragma unroll
  for (int i = ty; i < 32; i += 8) {
    const int64_t n = n0 + i, f = f0 + tx;
    tile[i][tx] = (n < n_batch && f < feat) ? x[n * feat + f] : T(0);
  }
  __syncthreads();
#pragma unroll
  for (int i = ty; i < 32; i += 8) {
    const int64_t f = f0 + i, n = n0 + tx;
    if (f < feat && n < np) xT[f * np + n] = tile[tx][i];
  }
}

inline int pick_bl(int64_t np, int V) {
  const int64_t lanes = (np + V - 1) / V;
  int bl = 1;
  while (bl < 32 && bl < lanes) bl <<= 1;
  return bl;
}

template <typename T>
int spmm_typed(const void* x, const int32_t* crow, const int32_t* col, const void* values, const void* bias,
               const int32_t* row_order, void* y, int64_t n_batch, int64_t np, int64_t out_f, int32_t in_f,
               int32_t nnz, cudaStream_t s) {
  constexpr int V = Vec<T>::V;
  const int bl = pick_bl(np, V);
  const dim3 block(32 * kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>((out_f + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>((np + static_cast<int64_t>(bl) * V - 1) / (static_cast<int64_t>(bl) * V)));
  const T* xp = static_cast<const T*>(x);
  const T* vp = static_cast<const T*>(values);
  const T* bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
#define RD_LAUNCH(B) \
  spmm_kernel<T, B><<<grid, block, 0, s>>>(xp, crow, col, vp, bp, row_order, yp, n_batch, np, out_f, in_f, nnz)
  switch (bl) {
    case 1: RD_LAUNCH(1); break;
    case 2: RD_LAUNCH(2); break;
    case 4: RD_LAUNCH(4); break;
    case 8: RD_LAUNCH(8); break;
    case 16: RD_LAUNCH(16); break;
    default: RD_LAUNCH(32); break;
  }
#undef RD_LAUNCH
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int sddmm_typed(const void* dy, const void* x, const int32_t* crow, const int32_t* col, const int32_t* row_order,
                void* dvalues, int64_t np, int64_t out_f, int32_t in_f, int32_t nnz, cudaStream_t s) {
  constexpr int V = Vec<T>::V;
  const int bl = pick_bl(np, V);
  const dim3 block(32 * kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>((out_f + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const T* dp = static_cast<const T*>(dy);
  const T* xp = static_cast<const T*>(x);
  T* op = static_cast<T*>(dvalues);
#define RD_LAUNCH(B) \
  sddmm_kernel<T, B><<<grid, block, 0, s>>>(dp, xp, crow, col, row_order, op, np, out_f, in_f, nnz)
  switch (bl) {
    case 1: RD_LAUNCH(1); break;
    case 2: RD_LAUNCH(2); break;
    case 4: RD_LAUNCH(4); break;
    case 8: RD_LAUNCH(8); break;
    case 16: RD_LAUNCH(16); break;
    default: RD_LAUNCH(32); break;
  }
#undef RD_LAUNCH
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// x: x^T padded, (in_f, n_pad) with n_pad = round_up(n_batch, 8); see the header for the rest.
int spmm_cuda_launch(DType dtype, const void* x, const int32_t* crow, const int32_t* col, const void* values,
                     const void* bias, const int32_t* row_order, void* y, int64_t n_batch, int64_t in_f,
                     int64_t out_f, int64_t nnz, void* stream) {
  if (out_f == 0 || n_batch == 0) return 0;
  // the kernels take int32 sizes for the guards (nnz < 2^31 as the int32 indices; in_f >= 1: the glue
  // writes the bias itself when there are no inputs)
  if (in_f < 1 || in_f > 2147483647LL || nnz < 0 || nnz > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  const int32_t fi = static_cast<int32_t>(in_f), nz = static_cast<int32_t>(nnz);
  const int64_t np = (n_batch + 7) / 8 * 8;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32: return spmm_typed<float>(x, crow, col, values, bias, row_order, y, n_batch, np, out_f, fi, nz, s);
    case DType::kBF16:
      return spmm_typed<__nv_bfloat16>(x, crow, col, values, bias, row_order, y, n_batch, np, out_f, fi, nz, s);
    case DType::kF16: return spmm_typed<__half>(x, crow, col, values, bias, row_order, y, n_batch, np, out_f, fi, nz, s);
    case DType::kF64: return spmm_typed<double>(x, crow, col, values, bias, row_order, y, n_batch, np, out_f, fi, nz, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int transpose_pad_cuda_launch(DType dtype, const void* x, void* xT, int64_t n_batch, int64_t feat, void* stream) {
  if (n_batch == 0 || feat == 0) return 0;
  const int64_t np = (n_batch + 7) / 8 * 8;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>((feat + 31) / 32), static_cast<unsigned>((np + 31) / 32));
  switch (dtype) {
#define RD_T(E, TY)                                                                                          \
    case E:                                                                                                  \
      transpose_pad_kernel<TY><<<grid, 256, 0, s>>>(static_cast<const TY*>(x), static_cast<TY*>(xT), n_batch, \
                                                    feat, np);                                               \
      break;
    RD_T(DType::kF32, float)
    RD_T(DType::kBF16, __nv_bfloat16)
    RD_T(DType::kF16, __half)
    RD_T(DType::kF64, double)
#undef RD_T
  }
  return static_cast<int>(cudaGetLastError());
}

// dy, x: dy^T (out_f, n_pad) and x^T (in_f, n_pad), zero-padded.
int sddmm_cuda_launch(DType dtype, const void* dy, const void* x, const int32_t* crow, const int32_t* col,
                      const int32_t* row_order, void* dvalues, int64_t n_batch, int64_t in_f, int64_t out_f,
                      int64_t nnz, void* stream) {
  if (out_f == 0) return 0;
  if (in_f < 0 || in_f > 2147483647LL || nnz < 0 || nnz > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  const int32_t fi = static_cast<int32_t>(in_f), nz = static_cast<int32_t>(nnz);
  const int64_t np = (n_batch + 7) / 8 * 8;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32: return sddmm_typed<float>(dy, x, crow, col, row_order, dvalues, np, out_f, fi, nz, s);
    case DType::kBF16: return sddmm_typed<__nv_bfloat16>(dy, x, crow, col, row_order, dvalues, np, out_f, fi, nz, s);
    case DType::kF16: return sddmm_typed<__half>(dy, x, crow, col, row_order, dvalues, np, out_f, fi, nz, s);
    case DType::kF64: return sddmm_typed<double>(dy, x, crow, col, row_order, dvalues, np, out_f, fi, nz, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace sparse
}  // namespace raydistill
