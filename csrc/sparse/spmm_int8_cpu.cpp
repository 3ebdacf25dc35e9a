// CPU kernel and schema of the int8 sparse linear op (raydistill::spmm_int8; the int16-activation op
// raydistill::spmm_int8_a16 is in spmm_int8_a16_cpu.cpp):
//
//   y[n, r] = scales[r] * sum_{k in row r} values[k] * x[n, col[k]] + bias[r]
//
// W (out x in) is CSR with int8 values, one fp32 scale per row (per output channel, symmetric), int32
// row pointers and column indices stored as uint16 (in_features <= 65536) or int32. x stays in its own
// float dtype (weight-only int8: activations are not quantized); math is fp32 (fp64 for fp64 x), the
// scale is applied once per output at write-back.
//
// Layout as in spmm_cpu.cpp: x is packed into batch tiles of T columns (64-byte aligned, so a 16-column
// fp32 row is one cache line); each nonzero does acc[0..T) += v * xp[c][0..T) with AVX2 FMAs. Eight
// int8 values are widened to fp32 with one load + two conversions and broadcast from a small buffer.
// Batches of <= 4 use a gathered dot product per row. Rows are split by work and run on torch's OpenMP
// team (run_parts, spmm_cpu_common.h). AVX512 is not used here: on the AVX2 machine this was written on
// it could not be measured, and the kernel is bound by the per-nonzero instruction count, not width.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RAYDISTILL_SPMM_I8_AVX2 1
#endif

#include "sparse/spmm_cpu_common.h"
#include "sparse/spmm_int8_cpu.h"

namespace raydistill {
namespace sparse {

// Shared by the CPU and CUDA implementations (one place for the argument rules).
void check_spmm_int8_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                          int64_t out_features) {
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble,
                   "spmm_int8: x must be float32/bfloat16/float16/float64, got ", st);
  TORCH_CHECK_VALUE(x.dim() == 2, "spmm_int8: x must be 2-D (N, in_features), got shape ", x.sizes());
  TORCH_CHECK_VALUE(out_features >= 0, "spmm_int8: out_features must be >= 0, got ", out_features);
  TORCH_CHECK_TYPE(crow.scalar_type() == at::kInt, "spmm_int8: crow_indices must be int32, got ", crow.scalar_type());
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() == out_features + 1, "spmm_int8: crow_indices must be 1-D with ",
                    out_features + 1, " entries, got shape ", crow.sizes());
  TORCH_CHECK_TYPE(col.scalar_type() == at::kInt || col.scalar_type() == at::kUInt16 || col.scalar_type() == at::kByte,
                   "spmm_int8: col_indices must be uint16 or int32 (CSR) or a uint8 row bitmap, got ",
                   col.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == at::kChar, "spmm_int8: values must be int8, got ", values.scalar_type());
  if (col.scalar_type() == at::kByte) {  // bitmap: (out_features, ceil(in_features / 8)), bit j of byte b = column 8b+j
    TORCH_CHECK_VALUE(col.dim() == 2 && col.size(0) == out_features && col.size(1) == (x.size(1) + 7) / 8,
                      "spmm_int8: a uint8 col_indices bitmap must have shape (", out_features, ", ",
                      (x.size(1) + 7) / 8, "), got ", col.sizes());
    TORCH_CHECK_VALUE(values.dim() == 1, "spmm_int8: values must be 1-D, got shape ", values.sizes());
  } else {
    TORCH_CHECK_VALUE(col.dim() == 1, "spmm_int8: col_indices must be 1-D, got shape ", col.sizes());
    TORCH_CHECK_VALUE(col.scalar_type() != at::kUInt16 || x.size(1) <= 65536,
                      "spmm_int8: uint16 col_indices need in_features <= 65536, got ", x.size(1));
    TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == col.numel(), "spmm_int8: values must be 1-D with nnz=",
                      col.numel(), " entries, got shape ", values.sizes());
  }
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "spmm_int8: scales must be float32, got ",
                   scales.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.numel() == out_features, "spmm_int8: scales must have shape (",
                    out_features, ",), got ", scales.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, "spmm_int8: bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == out_features, "spmm_int8: bias must have shape (",
                      out_features, ",), got ", bias->sizes());
  }
  const auto dev = x.device();
  TORCH_CHECK_VALUE(crow.device() == dev && col.device() == dev && values.device() == dev && scales.device() == dev &&
                        (!bias.has_value() || bias->device() == dev),
                    "spmm_int8: x, crow_indices, col_indices, values, scales and bias must be on the same device");
}

namespace {

using namespace cpu;

// acc[0..T) += sum_{k in [k0,k1)} q_k * xp[col_k][0..T) (unscaled). Returns false on an out-of-range column.
template <typename acc_t, typename idx_t, int T>
inline bool row_generic(const acc_t* __restrict xp, const idx_t* __restrict col, const int8_t* __restrict q,
                        int64_t k0, int64_t k1, uint32_t in_f, acc_t* __restrict acc) {
  acc_t a[T];
  for (int j = 0; j < T; ++j) a[j] = acc[j];
  bool ok = true;
  for (int64_t k = k0; k < k1; ++k) {
    const uint32_t c = static_cast<uint32_t>(col[k]);
    if (c >= in_f) { ok = false; continue; }
    const acc_t v = static_cast<acc_t>(q[k]);
    const acc_t* xr = xp + static_cast<int64_t>(c) * T;
    for (int j = 0; j < T; ++j) a[j] += v * xr[j];
  }
  for (int j = 0; j < T; ++j) acc[j] = a[j];
  return ok;
}

#ifdef RAYDISTILL_SPMM_I8_AVX2
// U independent accumulator sets keep U*T/8 >= 8 FMA chains in flight; 8 nonzeros per step.
template <typename idx_t, int T>
inline bool row_avx2(const float* __restrict xp, const idx_t* __restrict col, const int8_t* __restrict q,
                     int64_t k0, int64_t k1, uint32_t in_f, float* __restrict acc) {
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
  alignas(32) float vb[8];
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    uint32_t cs[8];
    uint32_t cmax = 0;
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) { cs[u] = static_cast<uint32_t>(col[k + u]); cmax = std::max(cmax, cs[u]); }
    if (__builtin_expect(cmax >= in_f, 0)) { ok = false; continue; }
    _mm256_store_ps(vb, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k)))));
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
      const __m256 v = _mm256_broadcast_ss(vb + u);
      const float* xr = xp + static_cast<int64_t>(cs[u]) * T;
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) a[u % U][j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 8 * j), a[u % U][j]);
    }
  }
  for (; k < k1; ++k) {
    const uint32_t c = static_cast<uint32_t>(col[k]);
    if (__builtin_expect(c >= in_f, 0)) { ok = false; continue; }
    const float* xr = xp + static_cast<int64_t>(c) * T;
    const __m256 v = _mm256_set1_ps(static_cast<float>(q[k]));
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

template <typename acc_t, typename idx_t, int T>
inline bool row_i8(const acc_t* xp, const idx_t* col, const int8_t* q, int64_t k0, int64_t k1, uint32_t in_f,
                   acc_t* acc) {
#ifdef RAYDISTILL_SPMM_I8_AVX2
  if constexpr (std::is_same_v<acc_t, float>) return row_avx2<idx_t, T>(xp, col, q, k0, k1, in_f, acc);
#endif
  return row_generic<acc_t, idx_t, T>(xp, col, q, k0, k1, in_f, acc);
}

template <typename scalar_t, typename acc_t, typename idx_t, int T>
void spmm_int8_tiled(const scalar_t* x, const int32_t* crow, const idx_t* col, const int8_t* q, const float* scales,
                     const float* bias, scalar_t* y, int64_t n, int64_t in_f, int64_t out_f) {
  const int64_t ntiles = (n + T - 1) / T;
  const at::Tensor xp_buf = scratch<acc_t>(ntiles * in_f * T);
  acc_t* xp = xp_buf.data_ptr<acc_t>();
  pack_tiles<scalar_t, acc_t>(x, n, in_f, T, xp);
  // column panels whose packed slab stays in L2 (one panel up to 4096 x 64 fp32)
  const int64_t P = std::max<int64_t>(64, panel_bytes() / (T * static_cast<int64_t>(sizeof(acc_t))));
  const int64_t Q = std::max<int64_t>(1, (in_f + P - 1) / P);
  const int64_t parts = num_parts(out_f, static_cast<int64_t>(crow[out_f]) * n);
  const std::vector<int64_t> bounds = balanced_rows(crow, out_f, parts);
  std::atomic<bool> bad{false};
  run_parts(parts, [&](int64_t p) {
    bool ok = true;
    const int64_t rb = bounds[p], re = bounds[p + 1], R = re - rb;
    if (R <= 0) return;
    std::vector<int64_t> ptr(static_cast<size_t>(R * (Q + 1)));
    for (int64_t r = rb; r < re; ++r) {
      int64_t* pr = ptr.data() + (r - rb) * (Q + 1);
      pr[0] = crow[r];
      pr[Q] = crow[r + 1];
      for (int64_t qq = 1; qq < Q; ++qq) {
        const idx_t* lo = col + std::max<int64_t>(pr[qq - 1], crow[r]);
        pr[qq] = std::lower_bound(lo, col + crow[r + 1], static_cast<idx_t>(std::min<int64_t>(qq * P, in_f)),
                                  [](idx_t a, idx_t b) { return static_cast<uint32_t>(a) < static_cast<uint32_t>(b); }) -
                 col;
      }
    }
    std::vector<acc_t> yacc(static_cast<size_t>(R * T));
    for (int64_t t = 0; t < ntiles; ++t) {
      const acc_t* xpt = xp + t * in_f * T;
      std::fill(yacc.begin(), yacc.end(), acc_t(0));
      for (int64_t i = 0; i < R; ++i) {
        const int64_t* pr = ptr.data() + i * (Q + 1);
        for (int64_t qq = 0; qq < Q; ++qq)
          if (pr[qq + 1] > pr[qq])
            ok &= row_i8<acc_t, idx_t, T>(xpt, col, q, pr[qq], pr[qq + 1], static_cast<uint32_t>(in_f),
                                          yacc.data() + i * T);
      }
      const int nb = static_cast<int>(std::min<int64_t>(T, n - t * T));
      for (int64_t g0 = 0; g0 < R; g0 += kRowGroup) {
        const int gr = static_cast<int>(std::min<int64_t>(kRowGroup, R - g0));
        for (int b = 0; b < nb; ++b) {
          scalar_t* yr = y + (t * T + b) * out_f + rb + g0;
          const acc_t* src = yacc.data() + g0 * T + b;
          for (int i = 0; i < gr; ++i) {
            const int64_t r = rb + g0 + i;
            acc_t s = src[i * T] * static_cast<acc_t>(scales[r]);
            if (bias) s += static_cast<acc_t>(bias[r]);
            yr[i] = static_cast<scalar_t>(s);
          }
        }
      }
    }
    if (!ok) bad.store(true);
  });
  TORCH_CHECK_VALUE(!bad.load(), "spmm_int8: col_indices out of range [0, in_features=", in_f, ")");
}

#ifdef RAYDISTILL_SPMM_I8_AVX2
// Small batches (N <= 4): per row, a gathered dot product over 8 nonzeros at a time, x in fp32 rows.
template <typename scalar_t, typename idx_t, int NB>
void spmm_int8_gather(const float* xf, const int32_t* crow, const idx_t* col, const int8_t* q, const float* scales,
                      const float* bias, scalar_t* y, int64_t in_f, int64_t out_f) {
  const int64_t parts = num_parts(out_f, static_cast<int64_t>(crow[out_f]) * NB);
  const std::vector<int64_t> bounds = balanced_rows(crow, out_f, parts);
  std::atomic<bool> bad{false};
  const __m256i lim = _mm256_set1_epi32(static_cast<int32_t>(in_f - 1));
  run_parts(parts, [&](int64_t p) {
    bool ok = true;
    for (int64_t r = bounds[p]; r < bounds[p + 1] && ok; ++r) {
      const int64_t k0 = crow[r], k1 = crow[r + 1];
      __m256 a[NB];
      for (int b = 0; b < NB; ++b) a[b] = _mm256_setzero_ps();
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) {
        __m256i c;
        if constexpr (std::is_same_v<idx_t, uint16_t>) {
          c = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col + k)));
        } else {
          c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k));
        }
        // out of range (negative int32 columns included): not (0 <= c < in_f)
        const __m256i bad = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), c), _mm256_cmpgt_epi32(c, lim));
        if (__builtin_expect(!_mm256_testz_si256(bad, bad), 0)) { ok = false; break; }
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k))));
        for (int b = 0; b < NB; ++b) a[b] = _mm256_fmadd_ps(v, _mm256_i32gather_ps(xf + b * in_f, c, 4), a[b]);
      }
      float tail[NB];
      for (int b = 0; b < NB; ++b) tail[b] = 0.f;
      for (; k < k1 && ok; ++k) {
        const uint32_t c = static_cast<uint32_t>(col[k]);
        if (c >= static_cast<uint32_t>(in_f)) { ok = false; break; }
        const float v = static_cast<float>(q[k]);
        for (int b = 0; b < NB; ++b) tail[b] += v * xf[b * in_f + c];
      }
      for (int b = 0; b < NB; ++b) {
        __m128 lo = _mm_add_ps(_mm256_castps256_ps128(a[b]), _mm256_extractf128_ps(a[b], 1));
        lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
        lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
        float s = (_mm_cvtss_f32(lo) + tail[b]) * scales[r];
        if (bias) s += bias[r];
        y[b * out_f + r] = static_cast<scalar_t>(s);
      }
    }
    if (!ok) bad.store(true);
  });
  TORCH_CHECK_VALUE(!bad.load(), "spmm_int8: col_indices out of range [0, in_features=", in_f, ")");
}
#endif

// The column indices of a row bitmap (LSB first: bit j of byte b is column 8b + j), decoded in parallel
// over row ranges into a transient CSR index array (what the kernels below read). Checks that every
// row has crow[r+1] - crow[r] bits set and none at or beyond in_f.
template <typename idx_t>
at::Tensor decode_bitmap(const uint8_t* bm, const int32_t* crow, int64_t out_f, int64_t in_f, at::ScalarType st) {
  const int64_t wb = (in_f + 7) / 8, nnz = crow[out_f];
  at::Tensor col = at::empty({nnz}, at::TensorOptions().dtype(st));
  idx_t* out = static_cast<idx_t*>(col.data_ptr());
  const int64_t parts = num_parts(out_f, nnz);
  const std::vector<int64_t> bounds = balanced_rows(crow, out_f, parts);
  std::atomic<bool> bad{false};
  run_parts(parts, [&](int64_t p) {
    for (int64_t r = bounds[p]; r < bounds[p + 1]; ++r) {
      const uint8_t* row = bm + r * wb;
      int64_t k = crow[r];
      const int64_t k1 = crow[r + 1];
      for (int64_t b = 0; b < wb; b += 8) {
        uint64_t w = 0;
        std::memcpy(&w, row + b, static_cast<size_t>(std::min<int64_t>(8, wb - b)));
        while (w) {
          const int64_t c = b * 8 + __builtin_ctzll(w);
          if (c >= in_f || k >= k1) { bad.store(true); return; }
          out[k++] = static_cast<idx_t>(c);
          w &= w - 1;
        }
      }
      if (k != k1) { bad.store(true); return; }
    }
  });
  TORCH_CHECK_VALUE(!bad.load(), "spmm_int8: the col_indices bitmap disagrees with crow_indices (a row's set bits "
                    "must number crow[r+1] - crow[r], all below in_features=", in_f, ")");
  return col;
}

}  // namespace

at::Tensor decode_bitmap_columns(const uint8_t* bm, const int32_t* crow, int64_t out_f, int64_t in_f) {
  return in_f <= 65536 ? decode_bitmap<uint16_t>(bm, crow, out_f, in_f, at::kUInt16)
                       : decode_bitmap<int32_t>(bm, crow, out_f, in_f, at::kInt);
}

at::Tensor spmm_int8_cpu(const at::Tensor& x_, const at::Tensor& crow_, const at::Tensor& col_,
                         const at::Tensor& values_, const at::Tensor& scales_, const std::optional<at::Tensor>& bias_,
                         int64_t out_features) {
  check_spmm_int8_args(x_, crow_, col_, values_, scales_, bias_, out_features);
  const at::Tensor x = x_.contiguous(), crow = crow_.contiguous(), values = values_.contiguous(),
                   scales = scales_.contiguous();
  at::Tensor col = col_.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_.has_value()) bias = bias_->contiguous();
  const int64_t n = x.size(0), in_f = x.size(1);
  at::Tensor y = at::empty({n, out_features}, x.options());
  if (n == 0 || out_features == 0) return y;
  const int32_t* cr = crow.data_ptr<int32_t>();
  check_row_pointers("spmm_int8", cr, out_features, values.numel());
  if (col.scalar_type() == at::kByte) {
    const uint8_t* bm = col.data_ptr<uint8_t>();
    col = in_f <= 65536 ? decode_bitmap<uint16_t>(bm, cr, out_features, in_f, at::kUInt16)
                        : decode_bitmap<int32_t>(bm, cr, out_features, in_f, at::kInt);
  }
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* sc = scales.data_ptr<float>();
  const int8_t* q = values.data_ptr<int8_t>();
  const bool col16 = col.scalar_type() == at::kUInt16;
  const int T = pick_tile(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "raydistill_spmm_int8_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto with_idx = [&](auto idx_tag) {
      using idx_t = decltype(idx_tag);
      const idx_t* c = static_cast<const idx_t*>(col.data_ptr());
#ifdef RAYDISTILL_SPMM_I8_AVX2
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (n <= 4 && std::getenv("RAYDISTILL_SPMM_TILE") == nullptr) {
          const at::Tensor xf = x.to(at::kFloat).contiguous();
          auto g = [&](auto nb) {
            constexpr int NB = decltype(nb)::value;
            spmm_int8_gather<scalar_t, idx_t, NB>(xf.data_ptr<float>(), cr, c, q, sc, b, y.data_ptr<scalar_t>(),
                                                  in_f, out_features);
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
        spmm_int8_tiled<scalar_t, acc_t, idx_t, TT>(x.data_ptr<scalar_t>(), cr, c, q, sc, b, y.data_ptr<scalar_t>(),
                                                    n, in_f, out_features);
      };
      switch (T) {
        case 8: run(std::integral_constant<int, 8>{}); break;
        case 16: run(std::integral_constant<int, 16>{}); break;
        case 32: run(std::integral_constant<int, 32>{}); break;
        default: run(std::integral_constant<int, 64>{}); break;
      }
    };
    if (col16) with_idx(uint16_t{}); else with_idx(int32_t{});
  });
  return y;
}

}  // namespace sparse
}  // namespace raydistill

TORCH_LIBRARY_FRAGMENT(raydistill, m) {
  m.def(
      "spmm_int8(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor scales, Tensor? bias, "
      "int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(raydistill, CPU, m) { m.impl("spmm_int8", &raydistill::sparse::spmm_int8_cpu); }
