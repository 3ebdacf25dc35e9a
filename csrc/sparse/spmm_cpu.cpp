// CPU kernels and schemas of the sparse linear ops (raydistill::spmm, raydistill::sddmm).
//
// Layout: x (N, in) is packed once per call into batch tiles of T columns, xp[t][i][0..T) in fp32
// (fp64 for fp64 inputs), zero-padded past N. Then y^T = W x^T: every nonzero (r, c, v) of W does
// acc[0..T) += v * xp[t][c][0..T), an axpy over a contiguous batch vector held in registers
// (T/8 AVX2 or, on AVX512 hosts (runtime check), T/16 zmm accumulators, unrolled over several nonzeros
// so that >= 8 FMA chains are in flight; the x rows of upcoming nonzeros are prefetched).
// Rows are split into parts by work (nnz prefix sums + a per-row cost), not by row count; the parts are
// handed out dynamically to the threads of torch's OpenMP team (the one MKL uses; see run_parts in
// spmm_cpu_common.h for why, and the inter-op alternative kept for measurement).
// Results of a group of rows are transposed through a small buffer so y is written contiguously.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RAYDISTILL_SPMM_AVX2 1
#endif

#include "sparse/spmm.h"
#include "sparse/spmm_cpu_common.h"

namespace raydistill {
namespace sparse {
namespace {

using namespace cpu;  // run_parts, balanced_rows, num_parts, pick_tile, pack_tiles, panel_bytes, ...


// acc[0..T) = sum_{k in [k0,k1)} v_k * xp[col_k][0..T). Returns false on an out-of-range column.
#ifdef RAYDISTILL_SPMM_AVX2
inline float hsum256(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

template <typename acc_t, typename val_t, int T>
inline bool row_axpy_generic(const acc_t* __restrict xp, const int32_t* __restrict col, const val_t* __restrict vals,
                             int64_t k0, int64_t k1, uint32_t in_f, acc_t* __restrict acc) {
  acc_t a[T];
  for (int j = 0; j < T; ++j) a[j] = acc[j];
  bool ok = true;
  for (int64_t k = k0; k < k1; ++k) {
    const uint32_t c = static_cast<uint32_t>(col[k]);
    if (c >= in_f) { ok = false; continue; }
    const acc_t v = to_acc(vals[k]);
    const acc_t* xr = xp + static_cast<int64_t>(c) * T;
    for (int j = 0; j < T; ++j) a[j] += v * xr[j];
  }
  for (int j = 0; j < T; ++j) acc[j] = a[j];
  return ok;
}

// Software prefetch distance (nonzeros) of the row kernels: the packed x rows of upcoming nonzeros come
// from L2 at random; 0 = off. RAYDISTILL_SPMM_PF overrides (read per call, so it can be A/B-timed).
inline int prefetch_distance() {
  const char* e = std::getenv("RAYDISTILL_SPMM_PF");
  return e ? std::max(0, std::atoi(e)) : 16;
}

#ifdef RAYDISTILL_SPMM_AVX2
// U independent accumulator sets (nonzeros k, k+1, ... go to set k % U) keep U*T/8 >= 8 FMA chains busy.
template <typename val_t, int T>
inline bool row_axpy_avx2(const float* __restrict xp, const int32_t* __restrict col, const val_t* __restrict vals,
                          int64_t k0, int64_t k1, uint32_t in_f, float* __restrict acc, int64_t pf) {
  constexpr int V = T / 8;
  constexpr int U = (V >= 8) ? 1 : 8 / V;
  __m256 a[U][V];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) a[u][j] = _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int j = 0; j < V; ++j) a[0][j] = _mm256_loadu_ps(acc + 8 * j);
  bool ok = true;
  int64_t k = k0;
  if (pf > 0) {
    for (; k + U + pf <= k1; k += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const uint32_t cp = std::min(static_cast<uint32_t>(col[k + u + pf]), in_f - 1);
        const char* pp = reinterpret_cast<const char*>(xp + static_cast<int64_t>(cp) * T);
#pragma GCC unroll 8
        for (int j = 0; j < (T * 4 + 63) / 64; ++j) _mm_prefetch(pp + 64 * j, _MM_HINT_T0);
        const uint32_t c = static_cast<uint32_t>(col[k + u]);
        if (__builtin_expect(c >= in_f, 0)) { ok = false; continue; }
        const float* xr = xp + static_cast<int64_t>(c) * T;
        const __m256 v = _mm256_set1_ps(to_acc(vals[k + u]));
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j) a[u][j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 8 * j), a[u][j]);
      }
    }
  }
  for (; k + U <= k1; k += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const uint32_t c = static_cast<uint32_t>(col[k + u]);
      if (__builtin_expect(c >= in_f, 0)) { ok = false; continue; }
      const float* xr = xp + static_cast<int64_t>(c) * T;
      const __m256 v = _mm256_set1_ps(to_acc(vals[k + u]));
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) a[u][j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 8 * j), a[u][j]);
    }
  }
  for (; k < k1; ++k) {
    const uint32_t c = static_cast<uint32_t>(col[k]);
    if (__builtin_expect(c >= in_f, 0)) { ok = false; continue; }
    const float* xr = xp + static_cast<int64_t>(c) * T;
    const __m256 v = _mm256_set1_ps(to_acc(vals[k]));
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) a[0][j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 8 * j), a[0][j]);
  }
#pragma GCC unroll 8
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) a[0][j] = _mm256_add_ps(a[0][j], a[u][j]);
#pragma GCC unroll 8
  for (int j = 0; j < V; ++j) _mm256_storeu_ps(acc + 8 * j, a[0][j]);
  return ok;
}
#endif

template <typename acc_t, typename val_t, int T>
inline bool row_axpy(const acc_t* xp, const int32_t* col, const val_t* vals, int64_t k0, int64_t k1,
                     uint32_t in_f, acc_t* acc, int64_t pf) {
#ifdef RAYDISTILL_SPMM_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    return row_axpy_avx2<val_t, T>(xp, col, vals, k0, k1, in_f, acc, pf);
  }
#endif
  (void)pf;
  return row_axpy_generic<acc_t, val_t, T>(xp, col, vals, k0, k1, in_f, acc);
}

// One column panel [ptr[i*S + q], ptr[i*S + q + 1]) of each of R rows: yacc[i][0..T) += W_row_i x^T.
template <typename acc_t, typename val_t, int T>
using rows_fn = bool (*)(const acc_t* xpt, const int32_t* col, const val_t* vals, const int64_t* ptr, int64_t R,
                         int64_t S, int64_t q, uint32_t in_f, acc_t* yacc);

template <typename acc_t, typename val_t, int T>
bool rows_axpy(const acc_t* xpt, const int32_t* col, const val_t* vals, const int64_t* ptr, int64_t R, int64_t S,
               int64_t q, uint32_t in_f, acc_t* yacc) {
  bool ok = true;
  const int64_t pf = prefetch_distance();
  for (int64_t i = 0; i < R; ++i) {
    const int64_t* pr = ptr + i * S;
    if (pr[q + 1] > pr[q])
      ok &= row_axpy<acc_t, val_t, T>(xpt, col, vals, pr[q], pr[q + 1], in_f, yacc + i * T, pf);
  }
  return ok;
}

// ---- AVX512 (compiled for the avx512 target only here; chosen at runtime by use_avx512()) ----------
#if defined(RAYDISTILL_SPMM_AVX2) && defined(__GNUC__)
#define RAYDISTILL_SPMM_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

template <typename val_t>
inline __m512 bcast512(const val_t* v) {
  if constexpr (std::is_same_v<val_t, float>) return _mm512_set1_ps(*v);
  else return _mm512_set1_ps(static_cast<float>(*v));
}

// T = 16*V batch columns in V zmm accumulators; U independent accumulator sets (nonzero k goes to set
// k % U) so that U*V >= 8 FMA chains are in flight. The next row's first x rows are prefetched.
template <typename val_t, int T>
bool rows_axpy512(const float* xpt, const int32_t* col, const val_t* vals, const int64_t* ptr, int64_t R, int64_t S,
                  int64_t q, uint32_t in_f, float* yacc) {
  static_assert(T % 16 == 0, "T must be a multiple of 16");
  constexpr int V = T / 16;
  constexpr int U = (V >= 4) ? 2 : 8 / V;
  const int64_t D = prefetch_distance();
  bool ok = true;
  for (int64_t i = 0; i < R; ++i) {
    const int64_t k0 = ptr[i * S + q], k1 = ptr[i * S + q + 1];
    if (k1 <= k0) continue;
    float* acc = yacc + i * T;
    __m512 a[U][V];
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) a[0][j] = _mm512_loadu_ps(acc + 16 * j);
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) a[u][j] = _mm512_setzero_ps();
    int64_t k = k0;
    if (D > 0) {
      for (; k + U + D <= k1; k += U) {
        uint32_t cs[U];
        uint32_t cmax = 0;
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) { cs[u] = static_cast<uint32_t>(col[k + u]); cmax = std::max(cmax, cs[u]); }
        if (__builtin_expect(cmax >= in_f, 0)) { ok = false; continue; }
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const uint32_t cp = std::min(static_cast<uint32_t>(col[k + u + D]), in_f - 1);
          const char* pp = reinterpret_cast<const char*>(xpt + static_cast<int64_t>(cp) * T);
#pragma GCC unroll 8
          for (int j = 0; j < V; ++j) _mm_prefetch(pp + 64 * j, _MM_HINT_T0);
          const float* xr = xpt + static_cast<int64_t>(cs[u]) * T;
          const __m512 v = bcast512(vals + k + u);
#pragma GCC unroll 8
          for (int j = 0; j < V; ++j) a[u][j] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16 * j), a[u][j]);
        }
      }
    }
    for (; k + U <= k1; k += U) {
      uint32_t cs[U];
      uint32_t cmax = 0;
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) { cs[u] = static_cast<uint32_t>(col[k + u]); cmax = std::max(cmax, cs[u]); }
      if (__builtin_expect(cmax >= in_f, 0)) { ok = false; continue; }
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const float* xr = xpt + static_cast<int64_t>(cs[u]) * T;
        const __m512 v = bcast512(vals + k + u);
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j) a[u][j] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16 * j), a[u][j]);
      }
    }
    for (; k < k1; ++k) {
      const uint32_t c = static_cast<uint32_t>(col[k]);
      if (__builtin_expect(c >= in_f, 0)) { ok = false; continue; }
      const float* xr = xpt + static_cast<int64_t>(c) * T;
      const __m512 v = bcast512(vals + k);
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) a[0][j] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16 * j), a[0][j]);
    }
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) a[0][j] = _mm512_add_ps(a[0][j], a[u][j]);
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) _mm512_storeu_ps(acc + 16 * j, a[0][j]);
  }
  return ok;
}

#pragma GCC pop_options
#endif

template <typename scalar_t, typename acc_t, int T>
rows_fn<acc_t, scalar_t, T> pick_rows_fn() {
#ifdef RAYDISTILL_SPMM_AVX512
  if constexpr (std::is_same_v<acc_t, float> && T >= 16) {
    if (use_avx512()) return &rows_axpy512<scalar_t, T>;
  }
#endif
  return &rows_axpy<acc_t, scalar_t, T>;
}

// y = x W^T + b via y^T = W x^T on packed batch tiles. The input dim is split into panels whose packed
// slab (P x T) fits in L2; each row keeps its running sums in yacc between panels.
template <typename scalar_t, typename acc_t, int T>
void spmm_tiled(const scalar_t* x, const int32_t* crow, const int32_t* col, const scalar_t* vals,
                const scalar_t* bias, scalar_t* y, int64_t n, int64_t in_f, int64_t out_f) {
  const int64_t ntiles = (n + T - 1) / T;
  const at::Tensor xp_buf = scratch<acc_t>(ntiles * in_f * T);
  const acc_t* xp = xp_buf.data_ptr<acc_t>();
  pack_tiles<scalar_t, acc_t>(x, n, in_f, T, xp_buf.data_ptr<acc_t>());
  const int64_t P = std::max<int64_t>(64, panel_bytes() / (T * static_cast<int64_t>(sizeof(acc_t))));
  const int64_t Q = std::max<int64_t>(1, (in_f + P - 1) / P);
  const int64_t parts = num_parts(out_f, static_cast<int64_t>(crow[out_f]) * n);
  const std::vector<int64_t> bounds = balanced_rows(crow, out_f, parts);
  const rows_fn<acc_t, scalar_t, T> kernel = pick_rows_fn<scalar_t, acc_t, T>();
  std::atomic<bool> bad{false};
  run_parts(parts, [&](int64_t p) {
    bool ok = true;
    const int64_t rb = bounds[p], re = bounds[p + 1], R = re - rb;
    if (R <= 0) return;
    // per-row nonzero ranges of each panel (columns are sorted within a row)
    std::vector<int64_t> ptr(static_cast<size_t>(R * (Q + 1)));
    for (int64_t r = rb; r < re; ++r) {
      int64_t* pr = ptr.data() + (r - rb) * (Q + 1);
      pr[0] = crow[r];
      pr[Q] = crow[r + 1];
      for (int64_t q = 1; q < Q; ++q) {
        const int32_t* lo = col + std::max<int64_t>(pr[q - 1], crow[r]);
        pr[q] = std::lower_bound(lo, col + crow[r + 1], static_cast<int32_t>(q * P)) - col;
      }
    }
    std::vector<acc_t> yacc(static_cast<size_t>(R * T));
    for (int64_t t = 0; t < ntiles; ++t) {
      const acc_t* xpt = xp + t * in_f * T;
      std::fill(yacc.begin(), yacc.end(), acc_t(0));
      for (int64_t q = 0; q < Q; ++q)
        ok &= kernel(xpt, col, vals, ptr.data(), R, Q + 1, q, static_cast<uint32_t>(in_f), yacc.data());
      const int nb = static_cast<int>(std::min<int64_t>(T, n - t * T));
      for (int64_t g0 = 0; g0 < R; g0 += kRowGroup) {
        const int gr = static_cast<int>(std::min<int64_t>(kRowGroup, R - g0));
        for (int b = 0; b < nb; ++b) {
          scalar_t* yr = y + (t * T + b) * out_f + rb + g0;
          const acc_t* src = yacc.data() + g0 * T + b;
          if (bias) {
            for (int i = 0; i < gr; ++i) yr[i] = static_cast<scalar_t>(src[i * T] + to_acc(bias[rb + g0 + i]));
          } else {
            for (int i = 0; i < gr; ++i) yr[i] = static_cast<scalar_t>(src[i * T]);
          }
        }
      }
    }
    if (!ok) bad.store(true);
  });
  TORCH_CHECK_VALUE(!bad.load(), "spmm: col_indices out of range [0, in_features=", in_f, ")");
}

#ifdef RAYDISTILL_SPMM_AVX2
// Small batches (N <= 4): per row, a gathered dot product over 8 nonzeros at a time, x kept in fp32 rows.
template <typename scalar_t, int NB>
void spmm_gather(const float* xf, const int32_t* crow, const int32_t* col, const scalar_t* vals,
                 const scalar_t* bias, scalar_t* y, int64_t in_f, int64_t out_f) {
  const int64_t parts = num_parts(out_f, static_cast<int64_t>(crow[out_f]) * NB);
  const std::vector<int64_t> bounds = balanced_rows(crow, out_f, parts);
  std::atomic<bool> bad{false};
  const __m256i lim = _mm256_set1_epi32(static_cast<int32_t>(in_f));
  run_parts(parts, [&](int64_t p) {
    bool ok = true;
    {
      for (int64_t r = bounds[p]; r < bounds[p + 1]; ++r) {
        const int64_t k0 = crow[r], k1 = crow[r + 1];
        __m256 a[NB], a2[NB];
        for (int b = 0; b < NB; ++b) { a[b] = _mm256_setzero_ps(); a2[b] = _mm256_setzero_ps(); }
        __m256i badv = _mm256_setzero_si256();
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) {
          const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k));
          const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k + 8));
          // out of range (incl. negative): not (0 <= c < in_f)
          badv = _mm256_or_si256(badv, _mm256_or_si256(
              _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), c0), _mm256_cmpgt_epi32(c0, _mm256_sub_epi32(lim, _mm256_set1_epi32(1)))),
              _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), c1), _mm256_cmpgt_epi32(c1, _mm256_sub_epi32(lim, _mm256_set1_epi32(1))))));
          if (__builtin_expect(!_mm256_testz_si256(badv, badv), 0)) { ok = false; break; }
          __m256 v0, v1;
          if constexpr (std::is_same_v<scalar_t, float>) {
            v0 = _mm256_loadu_ps(vals + k);
            v1 = _mm256_loadu_ps(vals + k + 8);
          } else {
            alignas(32) float tmp[16];
            for (int j = 0; j < 16; ++j) tmp[j] = static_cast<float>(vals[k + j]);
            v0 = _mm256_load_ps(tmp);
            v1 = _mm256_load_ps(tmp + 8);
          }
          for (int b = 0; b < NB; ++b) {
            const float* xb = xf + b * in_f;
            a[b] = _mm256_fmadd_ps(v0, _mm256_i32gather_ps(xb, c0, 4), a[b]);
            a2[b] = _mm256_fmadd_ps(v1, _mm256_i32gather_ps(xb, c1, 4), a2[b]);
          }
        }
        float tail[NB];
        for (int b = 0; b < NB; ++b) tail[b] = 0.f;
        for (; k < k1; ++k) {
          const uint32_t c = static_cast<uint32_t>(col[k]);
          if (c >= static_cast<uint32_t>(in_f)) { ok = false; continue; }
          const float v = static_cast<float>(vals[k]);
          for (int b = 0; b < NB; ++b) tail[b] += v * xf[b * in_f + c];
        }
        for (int b = 0; b < NB; ++b) {
          float s = hsum256(_mm256_add_ps(a[b], a2[b])) + tail[b];
          if (bias) s += static_cast<float>(bias[r]);
          y[b * out_f + r] = static_cast<scalar_t>(s);
        }
      }
    }
    if (!ok) bad.store(true);
  });
  TORCH_CHECK_VALUE(!bad.load(), "spmm: col_indices out of range [0, in_features=", in_f, ")");
}
#endif

// ---- SDDMM ----------------------------------------------------------------------------------------

template <typename acc_t, int T>
inline acc_t dot_generic(const acc_t* __restrict a, const acc_t* __restrict b) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int j = 0; j < T; ++j) s[j % 8] += a[j] * b[j];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}


template <typename acc_t, int T>
void sddmm_rows(const acc_t* dyp, const acc_t* xp, const int32_t* crow, const int32_t* col, int64_t r0, int64_t r1,
                uint32_t in_f, acc_t* out, bool& ok) {
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t* d = dyp + r * T;
    const int64_t k0 = crow[r], k1 = crow[r + 1];
#ifdef RAYDISTILL_SPMM_AVX2
    if constexpr (std::is_same_v<acc_t, float>) {
      constexpr int V = T / 8;
      __m256 dv[V];
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) dv[j] = _mm256_loadu_ps(d + 8 * j);
      int64_t k = k0;
      for (; k + 2 <= k1; k += 2) {
        const uint32_t c0 = static_cast<uint32_t>(col[k]), c1 = static_cast<uint32_t>(col[k + 1]);
        if (__builtin_expect(c0 >= in_f || c1 >= in_f, 0)) { ok = false; continue; }
        const float* x0 = xp + static_cast<int64_t>(c0) * T;
        const float* x1 = xp + static_cast<int64_t>(c1) * T;
        __m256 s0 = _mm256_mul_ps(dv[0], _mm256_loadu_ps(x0));
        __m256 s1 = _mm256_mul_ps(dv[0], _mm256_loadu_ps(x1));
#pragma GCC unroll 8
        for (int j = 1; j < V; ++j) {
          s0 = _mm256_fmadd_ps(dv[j], _mm256_loadu_ps(x0 + 8 * j), s0);
          s1 = _mm256_fmadd_ps(dv[j], _mm256_loadu_ps(x1 + 8 * j), s1);
        }
        // pairwise horizontal add of both sums at once
        const __m256 h = _mm256_hadd_ps(s0, s1);  // [s0 01 23, s1 01 23 | s0 45 67, s1 45 67]
        const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        out[k] += _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
        out[k + 1] += _mm_cvtss_f32(_mm_add_ss(_mm_shuffle_ps(q, q, 2), _mm_shuffle_ps(q, q, 3)));
      }
      for (; k < k1; ++k) {
        const uint32_t c = static_cast<uint32_t>(col[k]);
        if (__builtin_expect(c >= in_f, 0)) { ok = false; continue; }
        const float* xr = xp + static_cast<int64_t>(c) * T;
        __m256 s = _mm256_mul_ps(dv[0], _mm256_loadu_ps(xr));
#pragma GCC unroll 8
        for (int j = 1; j < V; ++j) s = _mm256_fmadd_ps(dv[j], _mm256_loadu_ps(xr + 8 * j), s);
        out[k] += hsum256(s);
      }
      continue;
    }
#endif
    for (int64_t k = k0; k < k1; ++k) {
      const uint32_t c = static_cast<uint32_t>(col[k]);
      if (c >= in_f) { ok = false; continue; }
      out[k] += dot_generic<acc_t, T>(d, xp + static_cast<int64_t>(c) * T);
    }
  }
}

template <typename scalar_t, typename acc_t, int T>
void sddmm_tiled(const scalar_t* dy, const scalar_t* x, const int32_t* crow, const int32_t* col, acc_t* out,
                 int64_t n, int64_t in_f, int64_t out_f) {
  const int64_t ntiles = (n + T - 1) / T;
  const at::Tensor xp_buf = scratch<acc_t>(ntiles * in_f * T), dyp_buf = scratch<acc_t>(ntiles * out_f * T);
  acc_t* xp = xp_buf.data_ptr<acc_t>();
  acc_t* dyp = dyp_buf.data_ptr<acc_t>();
  pack_tiles<scalar_t, acc_t>(x, n, in_f, T, xp);
  pack_tiles<scalar_t, acc_t>(dy, n, out_f, T, dyp);
  const int64_t parts = num_parts(out_f, static_cast<int64_t>(crow[out_f]) * n);
  const std::vector<int64_t> bounds = balanced_rows(crow, out_f, parts);
  std::atomic<bool> bad{false};
  run_parts(parts, [&](int64_t p) {
    bool ok = true;
    {
      for (int64_t t = 0; t < ntiles; ++t) {
        sddmm_rows<acc_t, T>(dyp + t * out_f * T, xp + t * in_f * T, crow, col, bounds[p],
                             bounds[p + 1], static_cast<uint32_t>(in_f), out, ok);
      }
    }
    if (!ok) bad.store(true);
  });
  TORCH_CHECK_VALUE(!bad.load(), "sddmm: col_indices out of range [0, in_features=", in_f, ")");
}

// ---- argument checks (one place) -------------------------------------------------------------------

void check_pattern(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t rows) {
  TORCH_CHECK_TYPE(crow.scalar_type() == at::kInt, op, ": crow_indices must be int32, got ", crow.scalar_type());
  TORCH_CHECK_TYPE(col.scalar_type() == at::kInt, op, ": col_indices must be int32, got ", col.scalar_type());
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() == rows + 1, op, ": crow_indices must be 1-D with ",
                    rows + 1, " entries, got shape ", crow.sizes());
  TORCH_CHECK_VALUE(col.dim() == 1, op, ": col_indices must be 1-D, got shape ", col.sizes());
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, op, ": ",
                   name, " must be float32/bfloat16/float16/float64, got ", st);
}

}  // namespace

// Shared by the CPU and CUDA implementations.
void check_spmm_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                     const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_float("spmm", "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, "spmm: x must be 2-D (N, in_features), got shape ", x.sizes());
  TORCH_CHECK_VALUE(out_features >= 0, "spmm: out_features must be >= 0, got ", out_features);
  check_pattern("spmm", crow, col, out_features);
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "spmm: values dtype ", values.scalar_type(),
                   " must match x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == col.numel(), "spmm: values must be 1-D with nnz=",
                    col.numel(), " entries, got shape ", values.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "spmm: bias dtype ", bias->scalar_type(),
                     " must match x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == out_features, "spmm: bias must have shape (",
                      out_features, ",), got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(x.device() == values.device() && x.device() == crow.device() && x.device() == col.device(),
                    "spmm: x, crow_indices, col_indices and values must be on the same device");
}

void check_sddmm_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col) {
  check_float("sddmm", "dy", dy);
  TORCH_CHECK_VALUE(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0),
                    "sddmm: dy (N, out) and x (N, in) must be 2-D with the same N, got ", dy.sizes(), " and ",
                    x.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "sddmm: dy dtype ", dy.scalar_type(),
                   " must match x dtype ", x.scalar_type());
  check_pattern("sddmm", crow, col, dy.size(1));
}

namespace {

at::Tensor spmm_cpu(const at::Tensor& x_, const at::Tensor& crow_, const at::Tensor& col_, const at::Tensor& values_,
                    const std::optional<at::Tensor>& bias_, int64_t out_features,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&) {
  check_spmm_args(x_, crow_, col_, values_, bias_, out_features);
  const at::Tensor x = x_.contiguous(), crow = crow_.contiguous(), col = col_.contiguous(),
                   values = values_.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_.has_value()) bias = bias_->contiguous();
  const int64_t n = x.size(0), in_f = x.size(1);
  at::Tensor y = at::empty({n, out_features}, x.options());
  if (n == 0 || out_features == 0) return y;
  check_row_pointers("spmm", crow.data_ptr<int32_t>(), out_features, col.numel());
  const int T = pick_tile(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "raydistill_spmm_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
#ifdef RAYDISTILL_SPMM_AVX2
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (n <= 4 && std::getenv("RAYDISTILL_SPMM_TILE") == nullptr) {
        const at::Tensor xf = x.to(at::kFloat).contiguous();
        auto g = [&](auto nb) {
          constexpr int NB = decltype(nb)::value;
          spmm_gather<scalar_t, NB>(xf.data_ptr<float>(), crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                                    values.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), in_f, out_features);
        };
        switch (n) {
          case 1: g(std::integral_constant<int, 1>{}); break;
          case 2: g(std::integral_constant<int, 2>{}); break;
          case 3: g(std::integral_constant<int, 3>{}); break;
          default: g(std::integral_constant<int, 4>{}); break;
        }
        return;
      }
    }
#endif
    auto run = [&](auto tile) {
      constexpr int TT = decltype(tile)::value;
      spmm_tiled<scalar_t, acc_t, TT>(x.data_ptr<scalar_t>(), crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                                      values.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), n, in_f, out_features);
    };
    switch (T) {
      case 8: run(std::integral_constant<int, 8>{}); break;
      case 16: run(std::integral_constant<int, 16>{}); break;
      case 32: run(std::integral_constant<int, 32>{}); break;
      default: run(std::integral_constant<int, 64>{}); break;
    }
  });
  return y;
}

at::Tensor sddmm_cpu(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& crow_, const at::Tensor& col_) {
  check_sddmm_args(dy_, x_, crow_, col_);
  const at::Tensor dy = dy_.contiguous(), x = x_.contiguous(), crow = crow_.contiguous(), col = col_.contiguous();
  const int64_t n = x.size(0), in_f = x.size(1), out_f = dy.size(1), nnz = col.numel();
  check_row_pointers("sddmm", crow.data_ptr<int32_t>(), out_f, nnz);
  const bool f64 = x.scalar_type() == at::kDouble;
  at::Tensor acc = at::zeros({nnz}, x.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (n > 0 && nnz > 0) {
    const int T = pick_tile(n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "raydistill_sddmm_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      auto run = [&](auto tile) {
        constexpr int TT = decltype(tile)::value;
        sddmm_tiled<scalar_t, acc_t, TT>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), crow.data_ptr<int32_t>(),
                                         col.data_ptr<int32_t>(), acc.data_ptr<acc_t>(), n, in_f, out_f);
      };
      switch (T) {
        case 8: run(std::integral_constant<int, 8>{}); break;
        case 16: run(std::integral_constant<int, 16>{}); break;
        case 32: run(std::integral_constant<int, 32>{}); break;
        default: run(std::integral_constant<int, 64>{}); break;
      }
    });
  }
  return acc.to(x.scalar_type());
}

}  // namespace
}  // namespace sparse
}  // namespace raydistill

TORCH_LIBRARY_FRAGMENT(raydistill, m) {
  m.def(
      "spmm(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, int out_features, "
      "Tensor? t_crow_indices=None, Tensor? t_col_indices=None, Tensor? t_perm=None) -> Tensor");
  m.def("sddmm(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices) -> Tensor");
}

TORCH_LIBRARY_IMPL(raydistill, CPU, m) {
  m.impl("spmm", &raydistill::sparse::spmm_cpu);
  m.impl("sddmm", &raydistill::sparse::sddmm_cpu);
}
