// Fused knowledge-distillation loss, one pass over HBM: the Hopper (sm_90) thread-block-cluster kernel.
//
// Why: the generic kernel (kd_loss_cuda.cu) gives a row to one block and walks it twice (statistics,
// then loss + gradient), so each student and teacher element is read twice from HBM: 10 bytes per
// element moved (bf16) where 6 are the minimum (read x, read t, write d loss / d x).
//
// Here a row is split across the C blocks of a thread-block cluster. Each thread loads its NV 16-byte
// vectors of student and teacher logits ONCE into registers; the row statistics (max, sum of exp) are
// reduced across the cluster through distributed shared memory (DSMEM); then the loss terms and the
// gradient are computed from the registers and the gradient is written with 16-byte streaming stores.
// HBM traffic is the minimum. Block b of a row's cluster owns elements [b*SEG, (b+1)*SEG), SEG =
// THREADS * NV * VEC, vector q of thread i at b*SEG + (q*THREADS + i)*VEC (coalesced per q).
//
// Arithmetic is in base 2 (ex2.approx): with c = log2(e)/T, exp((v - m)/T) = 2^((v - m) c). The
// cross-entropy softmax at T = 1 reuses the temperature exponentials when T == 2 (p1 = ps^2 * ss^2/s1)
// or T == 1 (p1 = ps); other temperatures take one more exp per element.
//
// Supported here: student and teacher of the same 16-bit or fp32 dtype, 16-byte aligned rows, V a
// multiple of the vector width, all three divergences with a full teacher, forward_kl and jsd with a
// top-k teacher. Anything else (fp64, mixed dtypes, unaligned rows, V beyond the largest cluster, a
// pre-Hopper GPU) runs the generic kernel; the launcher decides (kd_loss_cuda.cu).
//
// STATUS: compile-checked (sm_80, sm_90; <= 64 registers, no spills) but not yet run on a GPU, so it is
// opt-in: RAYDISTILL_KD_KERNEL=cluster. benchmarks/gpu/h200_check.sh checks it against float64 and the
// generic kernel and sweeps its launch configurations; make it the default once that passes.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kd_loss/kd_loss_cuda.h"

namespace cg = cooperative_groups;

namespace raydistill {
namespace kd {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kSlots = 16;  // DSMEM reduction slots (each reduction uses fresh ones: no reuse hazards)

__device__ __forceinline__ float ex2(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ float lg2(float v) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

// 16-byte vectors of element type S converted to/from float.
template <typename S> struct Vec16;
template <> struct Vec16<float> {
  static constexpr int N = 4;
  __device__ static __forceinline__ void to_float(const uint4& u, float (&o)[4]) {
    o[0] = __uint_as_float(u.x); o[1] = __uint_as_float(u.y); o[2] = __uint_as_float(u.z); o[3] = __uint_as_float(u.w);
  }
  __device__ static __forceinline__ uint4 from_float(const float (&g)[4]) {
    return make_uint4(__float_as_uint(g[0]), __float_as_uint(g[1]), __float_as_uint(g[2]), __float_as_uint(g[3]));
  }
  __device__ static __forceinline__ float one(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  __device__ static __forceinline__ float from1(float v) { return v; }
};
template <> struct Vec16<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ static __forceinline__ void to_float(const uint4& u, float (&o)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      o[2 * i] = f.x; o[2 * i + 1] = f.y;
    }
  }
  __device__ static __forceinline__ uint4 from_float(const float (&g)[8]) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(g[2 * i], g[2 * i + 1]);
    return u;
  }
  __device__ static __forceinline__ float one(const void* p, int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  __device__ static __forceinline__ __nv_bfloat16 from1(float v) { return __float2bfloat16(v); }
};
template <> struct Vec16<__half> {
  static constexpr int N = 8;
  __device__ static __forceinline__ void to_float(const uint4& u, float (&o)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      o[2 * i] = f.x; o[2 * i + 1] = f.y;
    }
  }
  __device__ static __forceinline__ uint4 from_float(const float (&g)[8]) {
    uint4 u;
    __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(g[2 * i], g[2 * i + 1]);
    return u;
  }
  __device__ static __forceinline__ float one(const void* p, int64_t i) {
    return __half2float(static_cast<const __half*>(p)[i]);
  }
  __device__ static __forceinline__ __half from1(float v) { return __float2half(v); }
};

enum RedOp { kMax = 0, kSum = 1 };

template <int OP>
__device__ __forceinline__ float combine(float a, float b) {
  if constexpr (OP == kMax) return fmaxf(a, b);
  else return a + b;
}

template <int OP>
__device__ __forceinline__ float identity() {
  if constexpr (OP == kMax) return -INFINITY;
  else return 0.f;
}

// Cluster-wide reduction of K values per thread. Every thread of every block of the cluster gets the
// results. `slot` indexes fresh DSMEM slots (K of them). Deterministic: fixed combination order.
template <int THREADS, int OP, int K, typename Cluster>
__device__ __forceinline__ void cluster_reduce(float (&v)[K], float* red, float* wsm, float* bcast, int slot,
                                               Cluster& cluster, int csize) {
  constexpr int NW = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] = combine<OP>(v[k], __shfl_xor_sync(0xffffffffu, v[k], o));
    if (lane == 0) wsm[k * NW + warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float r = lane < NW ? wsm[k * NW + lane] : identity<OP>();
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) r = combine<OP>(r, __shfl_xor_sync(0xffffffffu, r, o));
      if (lane == 0) red[slot + k] = r;
    }
  }
  cluster.sync();  // every block's partials are visible cluster-wide
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float r = identity<OP>();
      // lanes 0..csize-1 each fetch one block's partial; combine in rank order via shuffles
      float mine = identity<OP>();
      if (lane < csize) mine = *cluster.map_shared_rank(red + slot + k, lane);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mine = combine<OP>(mine, __shfl_xor_sync(0xffffffffu, mine, o));
      r = mine;
      if (lane == 0) bcast[slot + k] = r;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = bcast[slot + k];
}

template <typename S, int THREADS, int NV, bool TOPK>
__global__ void __launch_bounds__(THREADS, (1024 / THREADS > 1 ? 1024 / THREADS : 1)) kd_cluster_kernel(const KDLaunchArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using VT = Vec16<S>;
  constexpr int VEC = VT::N;
  constexpr int NW = THREADS / 32;
  __shared__ float red[kSlots];
  __shared__ float bcast[kSlots];
  __shared__ float wsm[4 * NW];

  auto cluster = cg::this_cluster();
  const int csize = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t row = static_cast<int64_t>(blockIdx.x) / csize;
  const int64_t V = a.V;
  const int64_t seg0 = static_cast<int64_t>(rank) * THREADS * NV * VEC;
  const uint4* __restrict__ xg = reinterpret_cast<const uint4*>(static_cast<const S*>(a.student) + row * a.student_row_stride);
  uint4* __restrict__ gg = a.grad ? reinterpret_cast<uint4*>(static_cast<S*>(a.grad) + row * V) : nullptr;
  float* loss_out = static_cast<float*>(a.loss);
  const int64_t label = a.labels ? a.labels[row] : -1;
  const bool ignored = a.labels && label == a.p.ignore_index;
  const bool bad_label = a.labels && !ignored && (label < 0 || label >= V);
  if (ignored || bad_label) {  // uniform over the cluster: no cluster barrier is reached by anyone
    const float fill = ignored ? 0.f : NAN;
    if (rank == 0 && threadIdx.x == 0) loss_out[row] = fill;
    if (gg) {
      float g[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[k] = fill;
      const uint4 u = VT::from_float(g);
#pragma unroll
      for (int q = 0; q < NV; ++q) {
        const int64_t pos = seg0 + (static_cast<int64_t>(q) * THREADS + threadIdx.x) * VEC;
        if (pos < V) __stcs(gg + pos / VEC, u);
      }
    }
    return;
  }

  // ---- the one read of this block's slice of the row
  uint4 xr[NV], tr[TOPK ? 1 : NV];
#pragma unroll
  for (int q = 0; q < NV; ++q) {
    const int64_t pos = seg0 + (static_cast<int64_t>(q) * THREADS + threadIdx.x) * VEC;
    if (pos < V) xr[q] = __ldcs(xg + pos / VEC);
  }
  if constexpr (!TOPK) {
    const uint4* __restrict__ tg =
        reinterpret_cast<const uint4*>(static_cast<const S*>(a.teacher) + row * a.teacher_row_stride);
#pragma unroll
    for (int q = 0; q < NV; ++q) {
      const int64_t pos = seg0 + (static_cast<int64_t>(q) * THREADS + threadIdx.x) * VEC;
      if (pos < V) tr[q] = __ldcs(tg + pos / VEC);
    }
  }

  // folded coefficients (optionally scaled on the device, e.g. 1 / number of valid rows)
  const float sc = a.scale ? *a.scale : 1.f;
  const float inv_t = static_cast<float>(a.p.inv_temperature);
  const float c2 = kLog2e * inv_t;                                   // base-2 exponent per raw logit unit
  const float coef = static_cast<float>(a.p.coef) * sc;             // loss weight of the divergence
  const float gcoef = static_cast<float>(a.p.coef * a.p.inv_temperature) * sc;
  const bool has_label = a.labels != nullptr;
  const float ce_w = has_label ? static_cast<float>(a.p.ce_weight) * sc : 0.f;
  const bool need_div = a.p.coef != 0;
  const bool need_ce = has_label && a.p.ce_weight != 0;
  const bool t_one = a.p.temperature_is_one;
  const bool t_two = a.p.inv_temperature == 0.5;
  const int div_kind = static_cast<int>(a.p.divergence);
  const float beta = static_cast<float>(a.p.beta), omb = static_cast<float>(1.0 - a.p.beta);
  const int64_t K = TOPK ? a.k : 0;
  const int cthreads = csize * THREADS;
  const int ctid = rank * THREADS + threadIdx.x;
  const S* __restrict__ tk = TOPK ? static_cast<const S*>(a.teacher) + row * a.k : nullptr;
  const int64_t* __restrict__ ik = TOPK ? a.topk_indices + row * a.k : nullptr;

  // ---- maxima (raw units)
  float mx[2] = {-INFINITY, -INFINITY};  // student, teacher
#pragma unroll
  for (int q = 0; q < NV; ++q) {
    const int64_t pos = seg0 + (static_cast<int64_t>(q) * THREADS + threadIdx.x) * VEC;
    if (pos < V) {
      float xv[VEC];
      VT::to_float(xr[q], xv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) mx[0] = fmaxf(mx[0], xv[k]);
      if constexpr (!TOPK) {
        float tv[VEC];
        VT::to_float(tr[q], tv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) mx[1] = fmaxf(mx[1], tv[k]);
      }
    }
  }
  if constexpr (TOPK) {
    for (int64_t j = ctid; j < K; j += cthreads) mx[1] = fmaxf(mx[1], VT::one(tk, j));
  }
  cluster_reduce<THREADS, kMax, 2>(mx, red, wsm, bcast, 0, cluster, csize);
  const float sm = mx[0], tm = mx[1];
  const float smc = sm * c2, tmc = tm * c2;

  // ---- sums of exponentials (NaN logits make the sums NaN, hence the row)
  float su[3] = {0.f, 0.f, 0.f};  // student at T, teacher at T, student at T = 1
  const bool sep1 = need_ce && !t_one;
#pragma unroll
  for (int q = 0; q < NV; ++q) {
    const int64_t pos = seg0 + (static_cast<int64_t>(q) * THREADS + threadIdx.x) * VEC;
    if (pos < V) {
      float xv[VEC];
      VT::to_float(xr[q], xv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float e = ex2(fmaf(xv[k], c2, -smc));
        su[0] += e;
        if (sep1) su[2] += t_two ? e * e : ex2((xv[k] - sm) * kLog2e);
      }
      if constexpr (!TOPK) {
        if (need_div) {
          float tv[VEC];
          VT::to_float(tr[q], tv);
#pragma unroll
          for (int k = 0; k < VEC; ++k) su[1] += ex2(fmaf(tv[k], c2, -tmc));
        }
      }
    }
  }
  if constexpr (TOPK) {
    if (need_div)
      for (int64_t j = ctid; j < K; j += cthreads) su[1] += ex2(fmaf(VT::one(tk, j), c2, -tmc));
  }
  cluster_reduce<THREADS, kSum, 3>(su, red, wsm, bcast, 2, cluster, csize);
  // log2 of the normalisers; a row with nothing finite (max -inf) is NaN like the generic kernel
  const float sl2 = (sm == -INFINITY) ? NAN : lg2(su[0]);
  const float tl2 = (tm == -INFINITY) ? NAN : lg2(su[1]);
  const float l12 = sep1 ? lg2(su[2]) : sl2;  // log2 sum exp(x - sm) at T = 1 (or the T sum when T == 1)
  // p1 = softmax(x)_i at T = 1 from ps (T == 2): ps^2 * ss^2 / s1
  const float k2 = (sep1 && t_two) ? (su[0] * su[0]) / su[2] : 1.f;
  const float sl2c = smc + sl2, tl2c = tmc + tl2;  // lps2 = x c2 - sl2c, lpt2 = t c2 - tl2c

  // ---- divergence (+ the per-row sums that reverse_kl / jsd gradients need)
  float dv[3] = {0.f, 0.f, 0.f};  // divergence (base-2 logs), jsd G (base 2), top-k student mass
  if (need_div) {
    if constexpr (!TOPK) {
#pragma unroll
      for (int q = 0; q < NV; ++q) {
        const int64_t pos = seg0 + (static_cast<int64_t>(q) * THREADS + threadIdx.x) * VEC;
        if (pos < V) {
          float xv[VEC], tv[VEC];
          VT::to_float(xr[q], xv);
          VT::to_float(tr[q], tv);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float lpt = fmaf(tv[k], c2, -tl2c), lps = fmaf(xv[k], c2, -sl2c);
            if (div_kind == kForwardKL) {
              const float pt = ex2(lpt);
              if (pt != 0.f) dv[0] += pt * (lpt - lps);
            } else if (div_kind == kReverseKL) {
              const float ps = ex2(lps);
              if (ps != 0.f) dv[0] += ps * (lps - lpt);
            } else {
              const float pt = ex2(lpt), ps = ex2(lps);
              const float lm = lg2(beta * pt + omb * ps);
              if (pt != 0.f) dv[0] += beta * pt * (lpt - lm);
              if (ps != 0.f) {
                const float gi = omb * ps * (lps - lm);
                dv[0] += gi;
                dv[1] += gi;
              }
            }
          }
        }
      }
    } else {
      for (int64_t j = ctid; j < K; j += cthreads) {
        const int64_t v = ik[j];
        if (v < 0 || v >= V) {
          dv[0] = NAN;
          continue;
        }
        const float lpt = fmaf(VT::one(tk, j), c2, -tl2c);
        const float lps = fmaf(VT::one(a.student, row * a.student_row_stride + v), c2, -sl2c);
        const float pt = ex2(lpt);
        if (div_kind == kForwardKL) {
          if (pt != 0.f) dv[0] += pt * (lpt - lps);
        } else {
          const float ps = ex2(lps);
          const float lm = lg2(beta * pt + omb * ps);
          if (pt != 0.f) dv[0] += beta * pt * (lpt - lm);
          if (ps != 0.f) {
            const float gi = omb * ps * (lps - lm);
            dv[0] += gi;
            dv[1] += gi;
          }
          dv[2] += ps;
        }
      }
    }
  }
  cluster_reduce<THREADS, kSum, 3>(dv, red, wsm, bcast, 5, cluster, csize);
  // natural-log units
  float div = dv[0] * kLn2, gsum = dv[1] * kLn2;
  float out_g = 0.f;  // jsd top-k: g_i outside the k entries
  if (TOPK && div_kind == kJSD) {
    out_g = -omb * logf(omb);
    const float rest = fmaxf(0.f, 1.f - dv[2]);
    div += rest * out_g;
    gsum += rest * out_g;
  }
  if (rank == 0 && threadIdx.x == 0) {
    float loss = need_div ? coef * div : 0.f;
    if (need_ce) {
      const float xl = VT::one(a.student, row * a.student_row_stride + label);
      loss += ce_w * ((sm - xl) + l12 * kLn2);
    }
    loss_out[row] = loss;
  }

  // ---- gradient from the registers
  if (gg) {
#pragma unroll
    for (int q = 0; q < NV; ++q) {
      const int64_t pos = seg0 + (static_cast<int64_t>(q) * THREADS + threadIdx.x) * VEC;
      if (pos < V) {
        float xv[VEC], g[VEC];
        VT::to_float(xr[q], xv);
        float tv[VEC];
        if constexpr (!TOPK) VT::to_float(tr[q], tv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float lps = fmaf(xv[k], c2, -sl2c);
          const float ps = ex2(lps);
          float gk = 0.f;
          if (need_div) {
            if constexpr (TOPK) {
              gk = (div_kind == kJSD ? gcoef * (out_g - gsum) : gcoef) * ps;
            } else {
              const float lpt = fmaf(tv[k], c2, -tl2c);
              const float pt = ex2(lpt);
              if (div_kind == kForwardKL) {
                gk = gcoef * (ps - pt);
              } else if (div_kind == kReverseKL) {
                gk = ps != 0.f ? gcoef * ps * ((lps - lpt) * kLn2 - div) : 0.f;
              } else {
                const float lm = lg2(beta * pt + omb * ps);
                gk = ps != 0.f ? gcoef * ps * (omb * (lps - lm) * kLn2 - gsum) : 0.f;
              }
            }
          }
          if (need_ce) {
            const float p1 = sep1 ? (t_two ? ps * ps * k2 : ex2(fmaf(xv[k], kLog2e, -(sm * kLog2e + l12)))) : ps;
            gk += ce_w * (p1 - ((pos + k) == label ? 1.f : 0.f));
          }
          g[k] = gk;
        }
        __stcs(gg + pos / VEC, VT::from_float(g));
      }
    }
    if constexpr (TOPK) {
      if (need_div) {
        // the k entries: exact gradient, written by the block that owns the position (after its base write)
        __syncthreads();
        const int64_t lo = seg0, hi = seg0 + static_cast<int64_t>(THREADS) * NV * VEC;
        S* grow = static_cast<S*>(a.grad) + row * V;
        for (int64_t j = threadIdx.x; j < K; j += THREADS) {
          const int64_t v = ik[j];
          if (v < lo || v >= hi || v >= V) continue;
          const float xv = VT::one(a.student, row * a.student_row_stride + v);
          const float lps = fmaf(xv, c2, -sl2c);
          const float ps = ex2(lps);
          const float lpt = fmaf(VT::one(tk, j), c2, -tl2c);
          const float pt = ex2(lpt);
          float gk;
          if (div_kind == kForwardKL) {
            gk = gcoef * (ps - pt);
          } else {
            const float lm = lg2(beta * pt + omb * ps);
            gk = ps != 0.f ? gcoef * ps * (omb * (lps - lm) * kLn2 - gsum) : 0.f;
          }
          if (need_ce) {
            const float p1 = sep1 ? (t_two ? ps * ps * k2 : ex2(fmaf(xv, kLog2e, -(sm * kLog2e + l12)))) : ps;
            gk += ce_w * (p1 - (v == label ? 1.f : 0.f));
          }
          grow[v] = VT::from1(gk);
        }
      }
    }
  }
  cluster.sync();  // no block leaves while a peer may still read its shared memory
#endif
}

// ------------------------------------------------------------------------------------------ launcher

struct Cfg {
  int threads, nv;
};

template <typename S, int THREADS, int NV, bool TOPK>
cudaError_t launch_one(const KDLaunchArgs& a, int csize, cudaStream_t stream) {
  auto kern = kd_cluster_kernel<S, THREADS, NV, TOPK>;
  if (csize > 8) {
    const cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) return e;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(a.rows * csize), 1, 1);
  cfg.blockDim = dim3(THREADS, 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = csize;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kern, &cfg) != cudaSuccess || clusters < 1) {
    cudaGetLastError();  // clear
    return cudaErrorNotSupported;
  }
  return cudaLaunchKernelEx(&cfg, kern, a);
}

// (threads, vectors per thread) configurations compiled in; chosen per V (or RAYDISTILL_KD_CLUSTER=t:nv).
template <typename S, bool TOPK>
cudaError_t launch_cfg(const KDLaunchArgs& a, Cfg c, int csize, cudaStream_t stream) {
#define RD_CFG(T_, N_) \
  if (c.threads == T_ && c.nv == N_) return launch_one<S, T_, N_, TOPK>(a, csize, stream);
  RD_CFG(256, 2)
  RD_CFG(256, 4)
  RD_CFG(512, 1)
  RD_CFG(512, 2)
  RD_CFG(512, 4)
  RD_CFG(1024, 1)
  RD_CFG(1024, 2)
#undef RD_CFG
  return cudaErrorNotSupported;
}

int max_cluster() {
  static int v = [] {
    const char* e = std::getenv("RAYDISTILL_KD_MAX_CLUSTER");
    return e ? std::atoi(e) : 16;
  }();
  return v;
}

// Pick the configuration: the fewest blocks per row (largest slices) that keep the cluster within the
// limit, preferring 512 threads (2 resident blocks per SM at <= 64 registers).
bool choose(int64_t V, int vec, Cfg& out, int& csize) {
  const char* env = std::getenv("RAYDISTILL_KD_CLUSTER");
  if (env) {
    Cfg c{0, 0};
    if (std::sscanf(env, "%d:%d", &c.threads, &c.nv) == 2) {
      const int64_t per = static_cast<int64_t>(c.threads) * c.nv * vec;
      const int64_t cs = (V + per - 1) / per;
      if (cs >= 1 && cs <= max_cluster()) {
        out = c;
        csize = static_cast<int>(cs);
        return true;
      }
    }
  }
  static const Cfg order[] = {{512, 2}, {512, 1}, {256, 2}, {512, 4}, {1024, 2}};
  for (const Cfg& c : order) {
    const int64_t per = static_cast<int64_t>(c.threads) * c.nv * vec;
    const int64_t cs = (V + per - 1) / per;
    // small vocabularies: avoid mostly-empty blocks (the generic warp-per-row kernel is better there)
    if (cs <= max_cluster() && V >= per / 2) {
      out = c;
      csize = static_cast<int>(cs);
      return true;
    }
  }
  return false;
}

bool hopper(int dev) {
  static int cached[64];
  static bool init[64] = {};
  if (dev < 0 || dev >= 64) return false;
  if (!init[dev]) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cached[dev] = major;
    init[dev] = true;
  }
  return cached[dev] >= 9;
}

template <typename S>
cudaError_t launch_typed(const KDLaunchArgs& a, cudaStream_t stream) {
  Cfg c{};
  int csize = 0;
  if (!choose(a.V, Vec16<S>::N, c, csize)) return cudaErrorNotSupported;
  return a.topk_indices ? launch_cfg<S, true>(a, c, csize, stream) : launch_cfg<S, false>(a, c, csize, stream);
}

// Opt-in until it has run on a GPU: RAYDISTILL_KD_KERNEL=cluster selects it (the generic kernel, checked
// against float64 on an H200, stays the default; RAYDISTILL_KD_KERNEL=generic or unset).
bool cluster_enabled() {
  const char* k = std::getenv("RAYDISTILL_KD_KERNEL");
  return k != nullptr && std::strcmp(k, "cluster") == 0;
}

}  // namespace

cudaError_t kd_loss_cuda_launch_cluster(const KDLaunchArgs& a, cudaStream_t stream) {
  if (!cluster_enabled()) return cudaErrorNotSupported;
  if (a.rows == 0 || a.V < 1) return cudaErrorNotSupported;
  if (a.student_dtype != a.teacher_dtype || a.student_dtype == kF64) return cudaErrorNotSupported;
  if (!a.student_aligned || (a.grad && !a.grad_aligned)) return cudaErrorNotSupported;
  if (!a.topk_indices && !a.teacher_aligned) return cudaErrorNotSupported;
  if (a.topk_indices && a.p.divergence == kReverseKL) return cudaErrorNotSupported;
  if (a.tail != nullptr) return cudaErrorNotSupported;  // the top-k teacher's rest bucket: generic kernel
  const int vec = a.student_dtype == kF32 ? 4 : 8;
  if (a.V % vec != 0) return cudaErrorNotSupported;
  if (a.rows > (int64_t{1} << 31) / 16) return cudaErrorNotSupported;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || !hopper(dev)) return cudaErrorNotSupported;
  switch (a.student_dtype) {
    case kF32: return launch_typed<float>(a, stream);
    case kBF16: return launch_typed<__nv_bfloat16>(a, stream);
    case kF16: return launch_typed<__half>(a, stream);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace kd
}  // namespace raydistill
