// Fused knowledge-distillation loss: CUDA kernels and their launcher. Plain CUDA C++ (no torch headers),
// so `make check-cuda` compiles it on machines without torch's CUDA headers; the torch-facing glue is
// kd_loss_cuda_glue.cpp. Formulas: kd_loss.h.
//
// A "team" of TPR threads handles one row: a whole 256-thread block for V >= 1024, one warp (8 rows
// per block) for smaller vocabularies. Each thread walks its row in chunks of 8 elements (16-byte
// vector loads/stores when the row pointers and the row stride are aligned, scalar otherwise and for
// the tail), keeping an online softmax (running max + sum) for teacher and student, combined across the
// team with warp shuffles (+ shared memory across warps). A second pass writes the row loss and
// d loss / d student; reverse_kl and jsd need a row-wide sum first, hence a third pass for them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kd_loss/kd_loss_cuda.h"

namespace raydistill {
namespace kd {
namespace {

constexpr int kBlock = 256;
constexpr int kChunk = 8;

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -INFINITY;
}

template <typename A, typename T>
__device__ __forceinline__ A cvt(T v) {
  return static_cast<A>(v);
}
template <>
__device__ __forceinline__ float cvt<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float cvt<float, __half>(__half v) {
  return __half2float(v);
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half(v);
}

__device__ __forceinline__ float fexp(float v) { return __expf(v); }
__device__ __forceinline__ double fexp(double v) { return exp(v); }
__device__ __forceinline__ float flog(float v) { return __logf(v); }
__device__ __forceinline__ double flog(double v) { return log(v); }

// Load `n` (<= 8) elements as A; lanes past n get `fill`. `vec`: p is 16-byte aligned and n == 8.
template <typename A, typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, int n, bool vec, A fill, A (&o)[kChunk]) {
  if (vec && n == kChunk) {
    constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte load
#pragma unroll
    for (int q = 0; q < kChunk / kPer; ++q) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + q);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int k = 0; k < kPer; ++k) o[q * kPer + k] = cvt<A>(e[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kChunk; ++k) o[k] = k < n ? cvt<A>(p[k]) : fill;
  }
}

template <typename T, typename A>
__device__ __forceinline__ void store8(T* __restrict__ p, int n, bool vec, const A (&g)[kChunk]) {
  if (vec && n == kChunk) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int q = 0; q < kChunk / kPer; ++q) {
      uint4 u;
      T* e = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int k = 0; k < kPer; ++k) e[k] = from_acc<T>(g[q * kPer + k]);
      reinterpret_cast<uint4*>(p)[q] = u;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kChunk; ++k)
      if (k < n) p[k] = from_acc<T>(g[k]);
  }
}

// Online softmax statistics of v * scale with the max kept in raw units.
template <typename A>
struct Online {
  A m, s;
  __device__ __forceinline__ Online() : m(neg_inf<A>()), s(A(0)) {}
  __device__ __forceinline__ void add(const A (&v)[kChunk], A scale) {
    A cm = v[0];
    bool nan = v[0] != v[0];
#pragma unroll
    for (int k = 1; k < kChunk; ++k) {
      cm = fmax(cm, v[k]);  // fmax drops NaN: tracked separately
      nan |= v[k] != v[k];
    }
    if (nan) {  // NaN logits make the row NaN (and keep it NaN through merges)
      s = A(NAN);
      if (m == neg_inf<A>()) m = A(0);
      return;
    }
    const A nm = fmax(m, cm);
    if (nm == neg_inf<A>()) return;  // nothing finite yet
    A acc = s * fexp((m - nm) * scale);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) acc += fexp((v[k] - nm) * scale);  // NaN logits propagate here
    m = nm;
    s = acc;
  }
  __device__ __forceinline__ void merge(A om, A os, A scale) {
    const A nm = fmax(m, om);
    if (nm == neg_inf<A>()) return;
    s = s * fexp((m - nm) * scale) + os * fexp((om - nm) * scale);
    m = nm;
  }
};

template <typename A>
__device__ __forceinline__ A shfl_xor(A v, int o) {
  return __shfl_xor_sync(0xffffffffu, v, o);
}

// Sum over the team (all TPR threads get the result). smem: >= 2 * kBlock / 32 values of A.
template <int TPR, typename A>
__device__ __forceinline__ A team_sum(A v, A* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
  if constexpr (TPR == 32) {
    return v;
  } else {
    const int lane = threadIdx.x % TPR;
    __syncthreads();  // smem may still be read by a previous reduction
    if (lane % 32 == 0) smem[lane / 32] = v;
    __syncthreads();
    A r = 0;
#pragma unroll
    for (int w = 0; w < TPR / 32; ++w) r += smem[w];
    return r;
  }
}

template <int TPR, typename A>
__device__ __forceinline__ void team_online(Online<A>& o, A scale, A* smem, A& m_out, A& l_out) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const A om = shfl_xor(o.m, off);
    const A os = shfl_xor(o.s, off);
    o.merge(om, os, scale);
  }
  if constexpr (TPR != 32) {
    const int lane = threadIdx.x % TPR;
    __syncthreads();
    if (lane % 32 == 0) {
      smem[lane / 32] = o.m;
      smem[TPR / 32 + lane / 32] = o.s;
    }
    __syncthreads();
    Online<A> r;
#pragma unroll
    for (int w = 0; w < TPR / 32; ++w) r.merge(smem[w], smem[TPR / 32 + w], scale);
    o = r;
  }
  m_out = o.m;
  l_out = (o.m == neg_inf<A>() || !(o.s == o.s)) ? A(NAN) : flog(o.s);
}

template <int TPR>
__device__ __forceinline__ void team_sync() {
  if constexpr (TPR == 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// g[pos] -= w for pos in [0, 8): unrolled compares keep g in registers (a dynamic index would not).
template <typename A>
__device__ __forceinline__ void subtract_onehot(A (&g)[kChunk], int64_t pos, A w) {
#pragma unroll
  for (int k = 0; k < kChunk; ++k)
    if (pos == k) g[k] -= w;
}

template <typename A>
struct Coefs {
  A inv_t, coef, gcoef, ce_w, beta, omb;
  bool need_div, need_ce, sep_ce;
};

template <typename A>
__device__ __forceinline__ Coefs<A> coefs(const KDLaunchArgs& a, bool has_label) {
  Coefs<A> c;
  const A sc = a.scale ? static_cast<A>(*a.scale) : A(1);
  c.inv_t = static_cast<A>(a.p.inv_temperature);
  c.coef = static_cast<A>(a.p.coef) * sc;
  c.gcoef = static_cast<A>(a.p.coef * a.p.inv_temperature) * sc;
  c.ce_w = static_cast<A>(a.p.ce_weight) * sc;
  c.beta = static_cast<A>(a.p.beta);
  c.omb = static_cast<A>(1.0 - a.p.beta);
  c.need_div = a.p.coef != 0;
  c.need_ce = a.p.ce_weight != 0 && has_label;
  c.sep_ce = c.need_ce && !a.p.temperature_is_one;
  return c;
}

// Full-vocabulary (topk == false) or top-k teacher rows.
template <typename S, typename T, typename A, int TPR, bool TOPK>
__global__ void __launch_bounds__(kBlock, 1) kd_loss_kernel(const KDLaunchArgs a) {
  __shared__ A smem[2 * kBlock / 32];
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kBlock / TPR) + threadIdx.x / TPR;
  if (row >= a.rows) return;  // uniform per team (TPR == 256: the whole block)
  const int64_t V = a.V;
  const S* __restrict__ x = static_cast<const S*>(a.student) + row * a.student_row_stride;
  const T* __restrict__ t = static_cast<const T*>(a.teacher) + row * a.teacher_row_stride;
  S* __restrict__ grad = a.grad ? static_cast<S*>(a.grad) + row * V : nullptr;
  A* loss_out = static_cast<A*>(a.loss);
  const int64_t label = a.labels ? a.labels[row] : -1;
  if (a.labels && label == a.p.ignore_index) {
    if (lane == 0) loss_out[row] = A(0);
    if (grad)
      for (int64_t i = lane; i < V; i += TPR) grad[i] = from_acc<S>(A(0));
    return;
  }
  if (a.labels && (label < 0 || label >= V)) {
    // Out-of-range label: the eager Python wrapper raises before launching; a compiled graph cannot
    // check data on the host without a sync, so the kernel marks the row NaN instead of reading out of
    // bounds.
    if (lane == 0) loss_out[row] = A(NAN);
    if (grad)
      for (int64_t i = lane; i < V; i += TPR) grad[i] = from_acc<S>(A(NAN));
    return;
  }
  const Coefs<A> c = coefs<A>(a, a.labels != nullptr);
  const bool vx = a.student_aligned, vt = a.teacher_aligned, vg = a.grad_aligned;
  const int div_kind = static_cast<int>(a.p.divergence);
  const bool full_t = !TOPK && c.need_div;

  // ---- pass 1: online softmax statistics
  Online<A> ot, os, o1;
  const bool do_s = c.need_div || (c.need_ce && !c.sep_ce);
  for (int64_t i = static_cast<int64_t>(lane) * kChunk; i < V; i += static_cast<int64_t>(TPR) * kChunk) {
    const int n = static_cast<int>(V - i < kChunk ? V - i : kChunk);
    A xv[kChunk];
    load8<A>(x + i, n, vx, neg_inf<A>(), xv);
    if (do_s) os.add(xv, c.inv_t);
    if (c.sep_ce) o1.add(xv, A(1));
    if (full_t) {
      A tv[kChunk];
      load8<A>(t + i, n, vt, neg_inf<A>(), tv);
      ot.add(tv, c.inv_t);
    }
  }
  if (TOPK && c.need_div) {
    for (int64_t j = lane; j < a.k; j += TPR) {
      A tv[kChunk];
      tv[0] = cvt<A>(t[j]);
#pragma unroll
      for (int q = 1; q < kChunk; ++q) tv[q] = neg_inf<A>();
      ot.add(tv, c.inv_t);
    }
  }
  A tm = 0, tl = 0, sm = 0, sl = 0, m1 = 0, l1 = 0;
  if (do_s) team_online<TPR>(os, c.inv_t, smem, sm, sl);
  if (c.need_div) team_online<TPR>(ot, c.inv_t, smem, tm, tl);
  if (c.sep_ce) {
    team_online<TPR>(o1, A(1), smem, m1, l1);
  } else {
    m1 = sm;
    l1 = sl;
  }

  // ---- top-k teacher with a tail (log R: its mass outside the k entries): the teacher's k probabilities
  // are scaled by 1 - R (lw = log(1 - R)), and the student's mass outside the k entries, q_rest, is summed
  // directly over those entries (a bitmap of the k indices in dynamic shared memory), not as 1 - its mass
  // on the k entries (float cancellation). Formulas: kd_topk_row in kd_loss_cpu.cpp.
  const bool has_tail = TOPK && c.need_div && a.tail != nullptr;
  A lr_t = neg_inf<A>(), r_t = 0, lw = 0, q_rest = 0;
  if (has_tail) {
    extern __shared__ __align__(16) unsigned char kd_dyn_smem[];
    const int64_t words = (V + 31) / 32;
    uint32_t* bits = reinterpret_cast<uint32_t*>(kd_dyn_smem) + (threadIdx.x / TPR) * words;
    for (int64_t w = lane; w < words; w += TPR) bits[w] = 0u;
    team_sync<TPR>();
    for (int64_t j = lane; j < a.k; j += TPR) {
      const int64_t v = a.topk_indices[row * a.k + j];
      if (v >= 0 && v < V) atomicOr(bits + (v >> 5), 1u << (v & 31));
    }
    team_sync<TPR>();
    A part = 0;
    for (int64_t i = static_cast<int64_t>(lane) * kChunk; i < V; i += static_cast<int64_t>(TPR) * kChunk) {
      const int n = static_cast<int>(V - i < kChunk ? V - i : kChunk);
      A xv[kChunk];
      load8<A>(x + i, n, vx, neg_inf<A>(), xv);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        const int64_t v = i + k;
        if (k < n && !((bits[v >> 5] >> (v & 31)) & 1u)) part += fexp((xv[k] - sm) * c.inv_t - sl);
      }
    }
    q_rest = team_sum<TPR>(part, smem);
    lr_t = static_cast<const A*>(a.tail)[row];
    r_t = fexp(lr_t);
    lw = flog(-expm1(lr_t));  // NaN for log R > 0 or NaN: the row's loss is NaN
  }

  // ---- pass 2: divergence (and the forward-KL gradient)
  A div = 0, gsum = 0, c_out = 0;
  const bool fused_grad = grad && c.need_div && div_kind == kForwardKL && !TOPK;
  if (c.need_div) {
    A part = 0, gpart = 0;
    if constexpr (!TOPK) {
      for (int64_t i = static_cast<int64_t>(lane) * kChunk; i < V; i += static_cast<int64_t>(TPR) * kChunk) {
        const int n = static_cast<int>(V - i < kChunk ? V - i : kChunk);
        A xv[kChunk], tv[kChunk], g[kChunk];
        load8<A>(x + i, n, vx, neg_inf<A>(), xv);
        load8<A>(t + i, n, vt, neg_inf<A>(), tv);
#pragma unroll
        for (int k = 0; k < kChunk; ++k) {
          const A lpt = (tv[k] - tm) * c.inv_t - tl;
          const A lps = (xv[k] - sm) * c.inv_t - sl;
          const A pt = fexp(lpt);
          if (div_kind == kForwardKL) {
            if (pt != A(0)) part += pt * (lpt - lps);
            if (fused_grad) {
              const A ps = fexp(lps);
              A gk = c.gcoef * (ps - pt);
              if (c.need_ce) gk += c.ce_w * (c.sep_ce ? fexp((xv[k] - m1) - l1) : ps);
              g[k] = gk;
            }
          } else {
            const A ps = fexp(lps);
            if (div_kind == kReverseKL) {
              if (ps != A(0)) part += ps * (lps - lpt);
            } else {
              const A lm = flog(c.beta * pt + c.omb * ps);
              if (pt != A(0)) part += c.beta * pt * (lpt - lm);
              if (ps != A(0)) {
                part += c.omb * ps * (lps - lm);
                gpart += ps * c.omb * (lps - lm);
              }
            }
          }
        }
        if (fused_grad) {
          if (c.need_ce) subtract_onehot(g, label - i, c.ce_w);
          store8(grad + i, n, vg, g);
        }
      }
    } else {
      for (int64_t j = lane; j < a.k; j += TPR) {
        const int64_t v = a.topk_indices[row * a.k + j];
        if (v < 0 || v >= V) {  // out-of-range index (see the label case above): NaN, no OOB read
          part = A(NAN);
          continue;
        }
        const A lpt = (cvt<A>(t[j]) - tm) * c.inv_t - tl + lw;
        const A lps = (cvt<A>(x[v]) - sm) * c.inv_t - sl;
        const A pt = fexp(lpt);
        if (div_kind == kForwardKL) {
          if (pt != A(0)) part += pt * (lpt - lps);
        } else {
          const A ps = fexp(lps);
          const A lm = flog(c.beta * pt + c.omb * ps);
          if (pt != A(0)) part += c.beta * pt * (lpt - lm);
          if (ps != A(0)) {
            part += c.omb * ps * (lps - lm);
            gpart += ps * c.omb * (lps - lm);
          }
          c_out += ps;  // student mass on the k entries (summed below)
        }
      }
    }
    div = team_sum<TPR>(part, smem);
    gsum = team_sum<TPR>(gpart, smem);
    if (TOPK && div_kind == kJSD) {
      const A ps_k = team_sum<TPR>(c_out, smem);
      if (has_tail) {  // buckets: M_rest = beta R + (1 - beta) q_rest
        const A lm = flog(c.beta * r_t + c.omb * q_rest);
        if (r_t != A(0)) div += c.beta * r_t * (lr_t - lm);
        c_out = q_rest > A(0) ? c.omb * (flog(q_rest) - lm) : A(0);  // g_i outside the k entries
        div += q_rest * c_out;
        gsum += q_rest * c_out;
      } else {
        c_out = -c.omb * flog(c.omb);  // g_i outside the k entries
        const A rest = fmax(A(0), A(1) - ps_k);
        div += rest * c_out;
        gsum += rest * c_out;
      }
    } else if (has_tail && r_t != A(0)) {
      div += r_t * (lr_t - flog(q_rest));  // forward_kl: R (log R - log q_rest)
    }
  }
  if (lane == 0) {
    A loss = c.need_div ? c.coef * div : A(0);
    if (c.need_ce) loss += c.ce_w * ((m1 - cvt<A>(x[label])) + l1);
    loss_out[row] = loss;
  }

  // ---- pass 3: gradient (reverse_kl, jsd, top-k, CE only)
  if (grad && !fused_grad) {
    for (int64_t i = static_cast<int64_t>(lane) * kChunk; i < V; i += static_cast<int64_t>(TPR) * kChunk) {
      const int n = static_cast<int>(V - i < kChunk ? V - i : kChunk);
      A xv[kChunk], tv[kChunk], g[kChunk];
      load8<A>(x + i, n, vx, neg_inf<A>(), xv);
      if (full_t && div_kind != kForwardKL) load8<A>(t + i, n, vt, neg_inf<A>(), tv);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        const A lps = (xv[k] - sm) * c.inv_t - sl;
        const A ps = do_s ? fexp(lps) : A(0);
        A gk = 0;
        if (c.need_div) {
          if (TOPK) {
            // forward_kl with a tail: the teacher's rest mass spread like the student's, P_s_i (1 - R / q_rest)
            const A base = div_kind == kJSD ? c.gcoef * (c_out - gsum)
                           : (has_tail && q_rest > A(0)) ? c.gcoef * (A(1) - r_t / q_rest) : c.gcoef;
            gk = (has_tail && ps == A(0)) ? A(0) : base * ps;
          } else if (div_kind == kReverseKL) {
            const A lpt = (tv[k] - tm) * c.inv_t - tl;
            gk = ps != A(0) ? c.gcoef * ps * (lps - lpt - div) : A(0);
          } else if (div_kind == kJSD) {
            const A lpt = (tv[k] - tm) * c.inv_t - tl;
            const A lm = flog(c.beta * fexp(lpt) + c.omb * ps);
            gk = ps != A(0) ? c.gcoef * ps * (c.omb * (lps - lm) - gsum) : A(0);
          }
        }
        if (c.need_ce) gk += c.ce_w * (c.sep_ce ? fexp((xv[k] - m1) - l1) : ps);
        g[k] = gk;
      }
      if (c.need_ce) subtract_onehot(g, label - i, c.ce_w);
      store8(grad + i, n, vg, g);
    }
    if (TOPK && c.need_div) {
      team_sync<TPR>();  // the base values above must land before the k entries are overwritten
      for (int64_t j = lane; j < a.k; j += TPR) {
        const int64_t v = a.topk_indices[row * a.k + j];
        if (v < 0 || v >= V) continue;
        const A xv = cvt<A>(x[v]);
        const A lps = (xv - sm) * c.inv_t - sl;
        const A ps = fexp(lps);
        const A pt = fexp((cvt<A>(t[j]) - tm) * c.inv_t - tl + lw);
        A gk;
        if (div_kind == kForwardKL) {
          gk = c.gcoef * (ps - pt);
        } else {
          const A lm = flog(c.beta * pt + c.omb * ps);
          gk = ps != A(0) ? c.gcoef * ps * (c.omb * (lps - lm) - gsum) : A(0);
        }
        if (c.need_ce) gk += c.ce_w * ((c.sep_ce ? fexp((xv - m1) - l1) : ps) - (v == label ? A(1) : A(0)));
        grad[v] = from_acc<S>(gk);
      }
    }
  }
}

// Dynamic shared memory of a launch: the bitmaps of the top-k entries (one per row of the block) when the
// top-k teacher has a tail; above the default 48 KiB per block the kernel is opted in to more.
template <typename K>
cudaError_t tail_smem(K kernel, const KDLaunchArgs& a, int rows_per_block, size_t& bytes) {
  bytes = 0;
  if (a.tail == nullptr || a.topk_indices == nullptr) return cudaSuccess;
  bytes = static_cast<size_t>(rows_per_block) * static_cast<size_t>((a.V + 31) / 32) * sizeof(uint32_t);
  if (bytes <= (48u << 10)) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename S, typename T, typename A, bool TOPK>
cudaError_t launch_typed(const KDLaunchArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  size_t smem = 0;
  if (a.V >= 1024) {
    auto kern = kd_loss_kernel<S, T, A, kBlock, TOPK>;
    const cudaError_t e = tail_smem(kern, a, 1, smem);
    if (e != cudaSuccess) return e;
    kern<<<static_cast<unsigned>(a.rows), kBlock, smem, stream>>>(a);
  } else {
    constexpr int kRowsPerBlock = kBlock / 32;
    const int64_t blocks = (a.rows + kRowsPerBlock - 1) / kRowsPerBlock;
    auto kern = kd_loss_kernel<S, T, A, 32, TOPK>;
    const cudaError_t e = tail_smem(kern, a, kRowsPerBlock, smem);
    if (e != cudaSuccess) return e;
    kern<<<static_cast<unsigned>(blocks), kBlock, smem, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename S, bool TOPK>
cudaError_t launch_teacher(const KDLaunchArgs& a, cudaStream_t stream) {
  switch (a.teacher_dtype) {
    case kF32: return launch_typed<S, float, float, TOPK>(a, stream);
    case kBF16: return launch_typed<S, __nv_bfloat16, float, TOPK>(a, stream);
    case kF16: return launch_typed<S, __half, float, TOPK>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <bool TOPK>
cudaError_t launch_all(const KDLaunchArgs& a, cudaStream_t stream) {
  if (a.student_dtype == kF64 || a.teacher_dtype == kF64) {
    if (a.student_dtype != kF64 || a.teacher_dtype != kF64) return cudaErrorInvalidValue;  // glue casts
    return launch_typed<double, double, double, TOPK>(a, stream);
  }
  switch (a.student_dtype) {
    case kF32: return launch_teacher<float, TOPK>(a, stream);
    case kBF16: return launch_teacher<__nv_bfloat16, TOPK>(a, stream);
    case kF16: return launch_teacher<__half, TOPK>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t kd_loss_cuda_launch(const KDLaunchArgs& args, cudaStream_t stream) {
  const cudaError_t fast = kd_loss_cuda_launch_cluster(args, stream);
  if (fast != cudaErrorNotSupported) return fast;
  return args.topk_indices ? launch_all<true>(args, stream) : launch_all<false>(args, stream);
}

}  // namespace kd
}  // namespace raydistill
