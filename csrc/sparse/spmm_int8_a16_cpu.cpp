// CPU kernel and schema of the int8 sparse linear op with int16 dynamic activations
// (raydistill::spmm_int8_a16; the weight-only op and the shared argument checks are in spmm_int8_cpu.cpp).
//
// Each row b of x is quantized symmetrically to int16 codes with its own scale (computed in fp32):
//   m_b = max_i |x[b, i]|,  inv_b = 32767 / m_b,  qx[b, i] = rint(x[b, i] * inv_b)  (|qx| <= 32767),
//   s_b = m_b / 32767  (a zero row: qx = 0, s_b = 0),
// and y[b, r] = (sum_k values[k] * qx[b, col[k]]) * scales[r] * s_b + bias[r], the sum exact in int32
// (AVX2 vpmaddwd on pairs of nonzeros; flushed to fp32 every <= 512 nonzeros, which bounds it below 2^31
// even for values of -128). The rounding of x is at most s_b / 2 = m_b / 65534 per element. A row with a
// non-finite entry is not rounded (inf/nan propagate as in fp32 math): such a call, and batches <= 4 on
// AVX2, run the weight-only kernel on the dequantized codes qx * s_b (the same numbers up to fp32 rounding).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RAYDISTILL_SPMM_A16_AVX2 1
#endif

#include "sparse/spmm_cpu_common.h"
#include "sparse/spmm_int8_cpu.h"

namespace raydistill {
namespace sparse {
namespace {

using namespace cpu;

constexpr float kA16Max = 32767.f;
constexpr int64_t kA16Chunk = 512;  // nonzeros per int32 partial sum (512 * 128 * 32767 < 2^31)

// Per-row scales of x (fp32) into s (n,) and inv (n,), and whether each row is finite; false if some
// row has a non-finite entry.
inline bool a16_row_scales(const float* xf, int64_t n, int64_t in_f, float* s, float* inv, char* finite_rows) {
  bool finite = true;
  for (int64_t b = 0; b < n; ++b) {
    const float* xr = xf + b * in_f;
    float m = 0.f;
    bool nan = false;
    int64_t i = 0;
#ifdef RAYDISTILL_SPMM_A16_AVX2
    __m256 mv = _mm256_setzero_ps(), nv = _mm256_setzero_ps();
    const __m256 sgn = _mm256_set1_ps(-0.f);
    for (; i + 8 <= in_f; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      mv = _mm256_max_ps(mv, _mm256_andnot_ps(sgn, v));
      nv = _mm256_or_ps(nv, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // max_ps would drop a nan
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, mv);
    for (int j = 0; j < 8; ++j) m = std::max(m, t[j]);
    nan = _mm256_movemask_ps(nv) != 0;
#endif
    for (; i < in_f; ++i) {
      nan |= std::isnan(xr[i]);
      m = std::max(m, std::fabs(xr[i]));
    }
    finite_rows[b] = !(nan || !std::isfinite(m));
    if (!finite_rows[b]) finite = false;
    s[b] = m / kA16Max;
    inv[b] = m > 0.f ? kA16Max / m : 0.f;
  }
  return finite;
}

// xq[t][i][j] = qx[t*T + j][i] (zero past n): int16 codes in batch tiles of T.
inline void a16_pack(const float* xf, const float* inv, int64_t n, int64_t in_f, int T, int16_t* xq) {
  const int64_t ntiles = (n + T - 1) / T;
  std::memset(xq, 0, static_cast<size_t>(ntiles * in_f * T) * sizeof(int16_t));
  constexpr int64_t kBlk = 256;
  const int64_t kblocks = (in_f + kBlk - 1) / kBlk;
  const int64_t nw = n * kblocks;  // (batch row, column block) items
  auto work = [&](int64_t w) {
    const int64_t b = w / kblocks, i0 = (w % kblocks) * kBlk, i1 = std::min(in_f, i0 + kBlk);
    const float* xr = xf + b * in_f;
    int16_t* dst = xq + (b / T) * in_f * T + (b % T);
    const float iv = inv[b];
    int64_t i = i0;
#ifdef RAYDISTILL_SPMM_A16_AVX2
    const __m256 ivv = _mm256_set1_ps(iv);
    alignas(32) int32_t t[8];
    for (; i + 8 <= i1; i += 8) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + i), ivv)));
      for (int j = 0; j < 8; ++j) dst[(i + j) * T] = static_cast<int16_t>(t[j]);
    }
#endif
    for (; i < i1; ++i) dst[i * T] = static_cast<int16_t>(std::nearbyint(xr[i] * iv));
  };
  // on the calling thread: a second parallel region (and its join) cost more than it saves at these sizes
  // (fixed cost per call 0.085 vs 0.15-0.25 ms at batch 16 x 4096, on a loaded 2-core machine)
  for (int64_t w = 0; w < nw; ++w) work(w);
}

// Generic (any host): exact int64 sums per (row, batch) from the packed codes.
template <typename scalar_t, typename idx_t>
bool a16_generic(const int16_t* xq, int T, const int32_t* crow, const idx_t* col, const int8_t* q, const float* scales,
                 const float* bias, const float* s, scalar_t* y, int64_t n, int64_t in_f, int64_t out_f) {
  const int64_t parts = num_parts(out_f, static_cast<int64_t>(crow[out_f]) * n);
  const std::vector<int64_t> bounds = balanced_rows(crow, out_f, parts);
  std::atomic<bool> bad{false};
  run_parts(parts, [&](int64_t p) {
    std::vector<int64_t> a(static_cast<size_t>(T));
    for (int64_t t = 0; t * T < n; ++t) {
      const int16_t* xt = xq + t * in_f * T;
      const int nb = static_cast<int>(std::min<int64_t>(T, n - t * T));
      for (int64_t r = bounds[p]; r < bounds[p + 1]; ++r) {
        std::fill(a.begin(), a.end(), int64_t(0));
        for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
          const uint32_t c = static_cast<uint32_t>(col[k]);
          if (c >= static_cast<uint32_t>(in_f)) { bad.store(true); return; }
          const int64_t v = q[k];
          for (int j = 0; j < nb; ++j) a[j] += v * xt[c * T + j];
        }
        for (int j = 0; j < nb; ++j) {
          double o = static_cast<double>(a[j]) * static_cast<double>(scales[r]) * static_cast<double>(s[t * T + j]);
          if (bias) o += bias[r];
          y[(t * T + j) * out_f + r] = static_cast<scalar_t>(o);
        }
      }
    }
  });
  return !bad.load();
}

#ifdef RAYDISTILL_SPMM_A16_AVX2
// True if any of the 16 columns at col is >= in_f (uint16 or int32 indices).
template <typename idx_t>
inline bool a16_block_bad(const idx_t* col, uint32_t in_f) {
  if constexpr (std::is_same_v<idx_t, uint16_t>) {
    if (in_f > 65535) return false;
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col));
    // unsigned c >= in_f  <=>  max(c, in_f) == c
    const __m256i lim = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(in_f)));
    return _mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_max_epu16(c, lim), c)) != 0;
  } else {
    const __m256i lim = _mm256_set1_epi32(static_cast<int32_t>(in_f));
    const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col));
    const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + 8));
    const __m256i b0 = _mm256_cmpeq_epi32(_mm256_max_epu32(c0, lim), c0);
    const __m256i b1 = _mm256_cmpeq_epi32(_mm256_max_epu32(c1, lim), c1);
    return !_mm256_testz_si256(_mm256_or_si256(b0, b1), _mm256_or_si256(b0, b1));
  }
}

// One row of one batch tile (T = 16 V): acc[0..T) (in vpmaddwd lane order: per 16-column group,
// batch 0-3, 8-11, 4-7, 12-15) = sum over [k0, k1) of q_k * xq[col_k][...]. Returns false on a bad column.
template <typename idx_t, int V>
inline bool a16_row(const int16_t* __restrict xt, const idx_t* __restrict col, const int8_t* __restrict q, int64_t k0,
                    int64_t k1, uint32_t in_f, float* __restrict acc) {
  constexpr int T = 16 * V;
  __m256 f[2 * V];
  for (int j = 0; j < 2 * V; ++j) f[j] = _mm256_setzero_ps();
  alignas(32) int32_t wp[8];
  int64_t k = k0;
  auto xrow = [&](uint32_t c) { return reinterpret_cast<const __m256i*>(xt + static_cast<int64_t>(c) * T); };
  while (k1 - k >= 2) {
    const int64_t kend = k + std::min<int64_t>(k1 - k, kA16Chunk);
    __m256i s[2][2 * V];
    for (int u = 0; u < 2; ++u)
      for (int j = 0; j < 2 * V; ++j) s[u][j] = _mm256_setzero_si256();
    for (; k + 16 <= kend; k += 16) {
      if (__builtin_expect(a16_block_bad<idx_t>(col + k, in_f), 0)) return false;
      _mm256_store_si256(reinterpret_cast<__m256i*>(wp),
                         _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) {
        const __m256i* A = xrow(static_cast<uint32_t>(col[k + 2 * u]));
        const __m256i* B = xrow(static_cast<uint32_t>(col[k + 2 * u + 1]));
        const __m256i w = _mm256_set1_epi32(wp[u]);
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) {
          const __m256i a = _mm256_load_si256(A + v), b = _mm256_load_si256(B + v);
          s[u & 1][2 * v] = _mm256_add_epi32(s[u & 1][2 * v], _mm256_madd_epi16(_mm256_unpacklo_epi16(a, b), w));
          s[u & 1][2 * v + 1] = _mm256_add_epi32(s[u & 1][2 * v + 1], _mm256_madd_epi16(_mm256_unpackhi_epi16(a, b), w));
        }
      }
    }
    for (; k + 2 <= kend; k += 2) {
      const uint32_t c1 = static_cast<uint32_t>(col[k]), c2 = static_cast<uint32_t>(col[k + 1]);
      if (__builtin_expect(c1 >= in_f || c2 >= in_f, 0)) return false;
      const __m256i w = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(q[k]))) |
                                          static_cast<int32_t>(static_cast<uint32_t>(static_cast<int32_t>(q[k + 1])) << 16));
      for (int v = 0; v < V; ++v) {
        const __m256i a = _mm256_load_si256(xrow(c1) + v), b = _mm256_load_si256(xrow(c2) + v);
        s[0][2 * v] = _mm256_add_epi32(s[0][2 * v], _mm256_madd_epi16(_mm256_unpacklo_epi16(a, b), w));
        s[0][2 * v + 1] = _mm256_add_epi32(s[0][2 * v + 1], _mm256_madd_epi16(_mm256_unpackhi_epi16(a, b), w));
      }
    }
    for (int j = 0; j < 2 * V; ++j) f[j] = _mm256_add_ps(f[j], _mm256_cvtepi32_ps(_mm256_add_epi32(s[0][j], s[1][j])));
  }
  if (k < k1) {  // an odd last nonzero, paired with a zero weight
    const uint32_t c = static_cast<uint32_t>(col[k]);
    if (__builtin_expect(c >= in_f, 0)) return false;
    const __m256i w = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(q[k]))));
    const __m256i z = _mm256_setzero_si256();
    for (int v = 0; v < V; ++v) {
      const __m256i a = _mm256_load_si256(xrow(c) + v);
      f[2 * v] = _mm256_add_ps(f[2 * v], _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_unpacklo_epi16(a, z), w)));
      f[2 * v + 1] = _mm256_add_ps(f[2 * v + 1], _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_unpackhi_epi16(a, z), w)));
    }
  }
  for (int j = 0; j < 2 * V; ++j) _mm256_store_ps(acc + 8 * j, f[j]);
  return true;
}

// Bit positions of every byte value: pos[v][0..popcount(v)) ascending, pos[v][8] = popcount(v).
struct ByteBits {
  alignas(16) uint8_t pos[256][16];
  ByteBits() {
    std::memset(pos, 0, sizeof(pos));
    for (int v = 0; v < 256; ++v) {
      int c = 0;
      for (int j = 0; j < 8; ++j)
        if ((v >> j) & 1) pos[v][c++] = static_cast<uint8_t>(j);
      pos[v][8] = static_cast<uint8_t>(c);
    }
  }
};

// The columns of one row of a row bitmap (LSB first: bit j of byte b is column 8b + j) into out, ascending:
// branch-free, 8 candidate slots written per byte and the count advanced by its popcount (a bit-scan loop
// mispredicts about once per word and cost more than the kernel). out must hold 8 * wb + 8 entries.
// Returns the number of columns, or -1 if one is at or beyond in_f (a padding bit).
inline int64_t a16_decode_row(const uint8_t* row, int64_t wb, int64_t in_f, uint16_t* out) {
  static const ByteBits bits;
  int64_t k = 0;
  for (int64_t j = 0; j < wb; ++j) {
    const uint8_t* e = bits.pos[row[j]];
    const __m128i p = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm_add_epi16(p, _mm_set1_epi16(static_cast<int16_t>(8 * j))));
    k += e[8];
  }
  if (k > 0 && out[k - 1] >= in_f) return -1;  // columns ascend: the last one is the largest
  return k;
}

// Position of batch column j (0..15) of a 16-column group in the vpmaddwd lane order.
constexpr int kA16Lane[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

// col: CSR column indices, or (bitmap != nullptr) unused: each row's columns are decoded from the row
// bitmap into a small per-thread buffer right before the row runs (no call-sized index array).
template <typename scalar_t, typename idx_t, int V>
bool a16_avx2(const int16_t* xq, const int32_t* crow, const idx_t* col, const uint8_t* bitmap, const int8_t* q,
              const float* scales, const float* bias, const float* s, scalar_t* y, int64_t n, int64_t in_f,
              int64_t out_f) {
  constexpr int T = 16 * V;
  const int64_t ntiles = (n + T - 1) / T;
  const int64_t parts = num_parts(out_f, static_cast<int64_t>(crow[out_f]) * n);
  const std::vector<int64_t> bounds = balanced_rows(crow, out_f, parts);
  std::atomic<bool> bad{false};
  run_parts(parts, [&](int64_t p) {
    const int64_t rb = bounds[p], R = bounds[p + 1] - rb;
    if (R <= 0) return;
    const at::Tensor buf = scratch<float>(R * T);
    float* yacc = buf.data_ptr<float>();
    const int64_t wb = (in_f + 7) / 8;
    std::vector<uint16_t> rowcols(bitmap ? static_cast<size_t>(8 * wb + 8) : 0);
    for (int64_t t = 0; t < ntiles; ++t) {
      const int16_t* xt = xq + t * in_f * T;
      for (int64_t i = 0; i < R; ++i) {
        const int64_t k0 = crow[rb + i], k1 = crow[rb + i + 1];
        bool ok;
        if (bitmap) {
          if constexpr (std::is_same_v<idx_t, uint16_t>) {
            ok = k1 >= k0 && a16_decode_row(bitmap + (rb + i) * wb, wb, in_f, rowcols.data()) == k1 - k0 &&
                 a16_row<uint16_t, V>(xt, rowcols.data(), q + k0, 0, k1 - k0, static_cast<uint32_t>(in_f), yacc + i * T);
          } else {
            ok = false;
          }
        } else {
          ok = a16_row<idx_t, V>(xt, col, q, k0, k1, static_cast<uint32_t>(in_f), yacc + i * T);
        }
        if (!ok) {
          bad.store(true);
          return;
        }
      }
      const int nb = static_cast<int>(std::min<int64_t>(T, n - t * T));
      for (int64_t g0 = 0; g0 < R; g0 += kRowGroup) {
        const int gr = static_cast<int>(std::min<int64_t>(kRowGroup, R - g0));
        for (int j = 0; j < nb; ++j) {
          const float sb = s[t * T + j];
          const int lane = 16 * (j / 16) + kA16Lane[j % 16];
          scalar_t* yr = y + (t * T + j) * out_f + rb + g0;
          const float* src = yacc + g0 * T + lane;
          for (int i = 0; i < gr; ++i) {
            const int64_t r = rb + g0 + i;
            float o = src[i * T] * scales[r] * sb;
            if (bias) o += bias[r];
            yr[i] = static_cast<scalar_t>(o);
          }
        }
      }
    }
  });
  return !bad.load();
}
#endif


}  // namespace

at::Tensor spmm_int8_a16_cpu(const at::Tensor& x_, const at::Tensor& crow_, const at::Tensor& col_,
                             const at::Tensor& values_, const at::Tensor& scales_, const std::optional<at::Tensor>& bias_,
                             int64_t out_features) {
  check_spmm_int8_args(x_, crow_, col_, values_, scales_, bias_, out_features);
  const int64_t n = x_.size(0), in_f = x_.size(1);
  if (n == 0 || out_features == 0 || in_f == 0) return spmm_int8_cpu(x_, crow_, col_, values_, scales_, bias_, out_features);
  const at::Tensor xf = x_.to(at::kFloat).contiguous();
  std::vector<float> s(static_cast<size_t>(n)), inv(static_cast<size_t>(n));
  std::vector<char> finite(static_cast<size_t>(n));
  const bool all_finite = a16_row_scales(xf.data_ptr<float>(), n, in_f, s.data(), inv.data(), finite.data());
  bool small = false;
#ifdef RAYDISTILL_SPMM_A16_AVX2
  small = n <= 4;
#endif
  if (small || !all_finite) {
    // Batches <= 4 (the gather kernel has no tiles to fill) and inputs with inf/nan (fp32 math propagates
    // them): the weight-only kernel on the dequantized codes; a non-finite row is passed as it is.
    at::Tensor xd = at::empty_like(xf);
    const float* xs = xf.data_ptr<float>();
    float* xo = xd.data_ptr<float>();
    for (int64_t b = 0; b < n; ++b)
      for (int64_t i = 0; i < in_f; ++i)
        xo[b * in_f + i] = finite[b] ? std::nearbyint(xs[b * in_f + i] * inv[b]) * s[b] : xs[b * in_f + i];
    return spmm_int8_cpu(xd, crow_, col_, values_, scales_, bias_, out_features).to(x_.scalar_type());
  }
  const at::Tensor crow = crow_.contiguous(), values = values_.contiguous(), scales = scales_.contiguous();
  const int32_t* cr = crow.data_ptr<int32_t>();
  cpu::check_row_pointers("spmm_int8_a16", cr, out_features, values.numel());
  at::Tensor col = col_.contiguous();
  const bool generic = std::getenv("RAYDISTILL_SPMM_A16_GENERIC") != nullptr;
  at::Tensor bitmap;  // decoded row by row inside the AVX2 kernel (in_f <= 65536)
  if (col.scalar_type() == at::kByte) {
    const uint8_t* bm = col.data_ptr<uint8_t>();
    bool fused = false;
#ifdef RAYDISTILL_SPMM_A16_AVX2
    fused = !generic && in_f <= 65536;
#endif
    if (fused) {
      bitmap = col;
      col = at::empty({0}, at::TensorOptions().dtype(at::kUInt16));
    } else {
      col = decode_bitmap_columns(bm, cr, out_features, in_f);
    }
  }
  std::optional<at::Tensor> bias;
  if (bias_.has_value()) bias = bias_->contiguous();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const uint8_t* bmp = bitmap.defined() ? bitmap.data_ptr<uint8_t>() : nullptr;
  const int T = n <= 16 ? 16 : 32;
  const at::Tensor xq_buf = at::empty({((n + T - 1) / T) * in_f * T}, at::TensorOptions().dtype(at::kShort));
  int16_t* xq = xq_buf.data_ptr<int16_t>();
  a16_pack(xf.data_ptr<float>(), inv.data(), n, in_f, T, xq);
  at::Tensor y = at::empty({n, out_features}, x_.options());
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_.scalar_type(), "raydistill_spmm_int8_a16_cpu", [&] {
    auto with_idx = [&](auto idx_tag) {
      using idx_t = decltype(idx_tag);
      const idx_t* c = static_cast<const idx_t*>(col.data_ptr());
      scalar_t* yp = y.data_ptr<scalar_t>();
#ifdef RAYDISTILL_SPMM_A16_AVX2
      if (!generic) {
        ok = T == 16 ? a16_avx2<scalar_t, idx_t, 1>(xq, cr, c, bmp, values.data_ptr<int8_t>(), scales.data_ptr<float>(),
                                                      b, s.data(), yp, n, in_f, out_features)
                     : a16_avx2<scalar_t, idx_t, 2>(xq, cr, c, bmp, values.data_ptr<int8_t>(), scales.data_ptr<float>(),
                                                      b, s.data(), yp, n, in_f, out_features);
        return;
      }
#endif
      ok = a16_generic<scalar_t, idx_t>(xq, T, cr, c, values.data_ptr<int8_t>(), scales.data_ptr<float>(), b, s.data(),
                                        yp, n, in_f, out_features);
    };
    if (col.scalar_type() == at::kUInt16) with_idx(uint16_t{}); else with_idx(int32_t{});
  });
  TORCH_CHECK_VALUE(ok || bmp == nullptr, "spmm_int8_a16: the col_indices bitmap disagrees with crow_indices (a row's "
                    "set bits must number crow[r+1] - crow[r], all below in_features=", in_f, ")");
  TORCH_CHECK_VALUE(ok, "spmm_int8_a16: col_indices out of range [0, in_features=", in_f, ")");
  return y;
}

}  // namespace sparse
}  // namespace raydistill

TORCH_LIBRARY_FRAGMENT(raydistill, m) {
  m.def(
      "spmm_int8_a16(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor scales, Tensor? bias, "
      "int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(raydistill, CPU, m) { m.impl("spmm_int8_a16", &raydistill::sparse::spmm_int8_a16_cpu); }
