// Fused knowledge-distillation loss: schemas (TORCH_LIBRARY_FRAGMENT) and the CPU kernels.
//
// Per row: one online-softmax pass over the teacher and student logits (per-lane running max and
// sum, rescaled once per 4 vectors), then one pass (forward_kl) or two passes (reverse_kl, jsd need a
// row-wide sum first) that produce the row loss and, when asked, d loss_row / d student. Nothing of
// size rows x V is allocated except that gradient. Math in float (double for float64 inputs).
// See kd_loss.h for the formulas.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kd_loss/kd_loss.h"
#include "kd_loss/kd_loss_checks.h"

namespace raydistill {
namespace kd {
namespace {

using at::vec::Vectorized;

template <typename A>
inline Vectorized<A> vexp(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<A, float>) {
    return v.exp_u20();  // ~1e-6 relative, several times faster than Sleef's u10 exp
  } else {
    return v.exp();
  }
}

template <typename A>
constexpr A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// Load n (<= lanes) values as A, filling the remaining lanes with `fill`.
template <typename A, typename T>
inline Vectorized<A> load(const T* p, int64_t n, A fill) {
  using V = Vectorized<A>;
  if constexpr (std::is_same_v<A, T>) {
    if (n >= V::size()) return V::loadu(p);
    return V::set(V(fill), V::loadu(p, n), n);
  } else {
    alignas(64) A tmp[V::size()];
    for (int64_t k = 0; k < V::size(); ++k) tmp[k] = k < n ? static_cast<A>(p[k]) : fill;
    return V::loadu(tmp);
  }
}

template <typename A, typename T>
inline void store(const Vectorized<A>& v, T* p, int64_t n) {
  using V = Vectorized<A>;
  if constexpr (std::is_same_v<A, T>) {
    v.store(p, n);
  } else {
    alignas(64) A tmp[V::size()];
    v.store(tmp);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<T>(tmp[k]);
  }
}

template <typename A>
inline Vectorized<A> masked(const Vectorized<A>& value, const Vectorized<A>& mask) {
  return Vectorized<A>::blendv(Vectorized<A>(A(0)), value, mask);
}

template <typename A>
inline A hsum(const Vectorized<A>& v) {
  alignas(64) A tmp[Vectorized<A>::size()];
  v.store(tmp);
  A s = 0;
  for (int64_t k = 0; k < Vectorized<A>::size(); ++k) s += tmp[k];
  return s;
}

// Row sum of vectors: float lanes for up to 16 vectors, then flushed into a double (rows of ~1e5 terms
// would otherwise lose ~1e-5 relative, which the reverse-KL/JSD gradients amplify by cancellation).
template <typename A>
struct RowSum {
  Vectorized<A> part{A(0)};
  int cnt = 0;
  double total = 0;
  inline void add(const Vectorized<A>& v) {
    part = part + v;
    if (++cnt == 16) flush();
  }
  inline void flush() {
    total += static_cast<double>(hsum(part));
    part = Vectorized<A>(A(0));
    cnt = 0;
  }
  inline A get() {
    flush();
    return static_cast<A>(total);
  }
};

template <typename A>
struct LSE {
  A m = 0, l = 0;  // raw row max and log(sum(exp((v - m) * scale)))
};

// Per-lane online softmax statistics (running max m and sum s of exp(v - m)).
template <typename A>
struct Online {
  using V = Vectorized<A>;
  V m{neg_inf<A>()};
  V s{A(0)};
  V c{A(0)};  // Kahan compensation of s

  // v: raw logits; the statistics are of softmax(v * scale) with the max kept in raw units, so that
  // (v - m) is exact for nearby values and only then scaled.
  template <int U>
  inline void add(const V* v, const V& scale) {
    V cm = v[0];
    for (int u = 1; u < U; ++u) cm = at::vec::maximum(cm, v[u]);
    const V nm = at::vec::maximum(m, cm);  // NaN-propagating
    const V safe = V::blendv(nm, V(A(0)), nm == V(neg_inf<A>()));  // all -inf so far: no NaN
    const V r = vexp((m - safe) * scale);
    V chunk = vexp((v[0] - safe) * scale);
    for (int u = 1; u < U; ++u) chunk = chunk + vexp((v[u] - safe) * scale);
    accumulate(r, chunk);
    m = nm;
  }

  // add<U>(v, 0.5) on this and add<U>(v, 1) on `one` at once, with the exps of the second derived by
  // squaring those of the first: exp(v - m) = exp((v - m) / 2)^2, the same raw max in both. Used at T = 2
  // with a cross-entropy term (its softmax at T = 1): 1 exp per element instead of 2.
  template <int U>
  inline void add_sq(const V* v, const V& half, Online& one) {
    V cm = v[0];
    for (int u = 1; u < U; ++u) cm = at::vec::maximum(cm, v[u]);
    const V nm = at::vec::maximum(m, cm);
    const V safe = V::blendv(nm, V(A(0)), nm == V(neg_inf<A>()));
    const V r = vexp((m - safe) * half);
    V e = vexp((v[0] - safe) * half);
    V chunk = e, chunk1 = e * e;
    for (int u = 1; u < U; ++u) {
      e = vexp((v[u] - safe) * half);
      chunk = chunk + e;
      chunk1 = chunk1 + e * e;
    }
    accumulate(r, chunk);
    one.accumulate(r * r, chunk1);
    m = nm;
    one.m = nm;
  }

  // s = s * r + chunk, Kahan-compensated: a float lane sums ~V/8 terms, whose rounding (~1e-5 relative
  // for V ~ 1e5) would shift every log-probability of the row by as much.
  inline void accumulate(const V& r, const V& chunk) {
    const V sr = s * r;
    const V y = chunk - c * r;
    const V tt = sr + y;
    c = (tt - sr) - y;
    s = tt;
  }

  // log softmax(v)_i = (v_i - c.m) - c.l. The max and the log-sum are kept apart: folding them into one
  // float would round log(sum) to the spacing of floats near the max (1e-3 for logits ~1e4).
  inline LSE<A> finish(A scale) const {
    alignas(64) A mm[V::size()];
    alignas(64) A ss[V::size()];
    m.store(mm);
    s.store(ss);
    A mx = neg_inf<A>();
    const A nan_v = std::numeric_limits<A>::quiet_NaN();
    for (int64_t k = 0; k < V::size(); ++k) {
      if (std::isnan(mm[k])) return {nan_v, nan_v};
      mx = std::max(mx, mm[k]);
    }
    if (mx == neg_inf<A>()) return {nan_v, nan_v};  // no finite logit in the row
    if (mx == std::numeric_limits<A>::infinity()) return {nan_v, nan_v};
    alignas(64) A cc[V::size()];
    c.store(cc);
    double z = 0;
    for (int64_t k = 0; k < V::size(); ++k)
      if (mm[k] != neg_inf<A>())
        z += (static_cast<double>(ss[k]) - cc[k]) * std::exp(static_cast<double>(mm[k] - mx) * scale);
    return {mx, static_cast<A>(std::log(z))};
  }
};

template <typename A>
struct RowParams {
  A inv_t, coef, ce_w, beta, one_m_beta, gcoef;  // gcoef = coef / T
  bool need_div, need_ce, sep_ce, grad;
  bool sq;  // T = 2 with a separate CE softmax: its exps are the squares of the student's at T (add_sq)
};

template <typename A>
RowParams<A> row_params(const KDParams& p, bool has_label) {
  RowParams<A> r;
  r.inv_t = static_cast<A>(p.inv_temperature);
  r.coef = static_cast<A>(p.coef);
  r.ce_w = static_cast<A>(p.ce_weight);
  r.beta = static_cast<A>(p.beta);
  r.one_m_beta = static_cast<A>(1.0 - p.beta);
  r.gcoef = static_cast<A>(p.coef * p.inv_temperature);
  r.need_div = p.coef != 0;
  r.need_ce = p.ce_weight != 0 && has_label;
  r.sep_ce = r.need_ce && !p.temperature_is_one;  // CE needs its own softmax at T = 1
  r.grad = p.compute_grad;
  r.sq = r.need_div && r.sep_ce && p.inv_temperature == 0.5;
  return r;
}

// Statistics pass over a student row (and the teacher row if T_ is not void).
template <typename A, typename S, typename T>
void stats_pass(const S* x, const T* t, int64_t V, const RowParams<A>& rp, LSE<A>& ct, LSE<A>& cs,
                LSE<A>& c1) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  constexpr int U = 4;
  const Vec vinv(rp.inv_t), one(A(1));
  Online<A> ot, os, o1;
  const bool do_t = t != nullptr;
  const bool do_s = rp.need_div || (rp.need_ce && !rp.sep_ce);
  int64_t i = 0;
  for (; i + U * W <= V; i += U * W) {
    Vec xv[U], tv[U];
    for (int u = 0; u < U; ++u) {
      xv[u] = load<A>(x + i + u * W, W, neg_inf<A>());
      if (do_t) tv[u] = load<A>(t + i + u * W, W, neg_inf<A>());
    }
    if (rp.sq) {
      os.template add_sq<U>(xv, vinv, o1);
    } else {
      if (do_s) os.template add<U>(xv, vinv);
      if (rp.sep_ce) o1.template add<U>(xv, one);
    }
    if (do_t) ot.template add<U>(tv, vinv);
  }
  for (; i < V; i += W) {
    const int64_t n = std::min<int64_t>(W, V - i);
    Vec xv = load<A>(x + i, n, neg_inf<A>());
    if (rp.sq) {
      os.template add_sq<1>(&xv, vinv, o1);
    } else {
      if (do_s) os.template add<1>(&xv, vinv);
      if (rp.sep_ce) o1.template add<1>(&xv, one);
    }
    if (do_t) {
      Vec tv = load<A>(t + i, n, neg_inf<A>());
      ot.template add<1>(&tv, vinv);
    }
  }
  if (do_t) ct = ot.finish(rp.inv_t);
  if (do_s) cs = os.finish(rp.inv_t);
  c1 = rp.sep_ce ? o1.finish(A(1)) : cs;
}

// Adds the cross-entropy gradient (1 - alpha)(softmax(x) - onehot(label)) to g for lanes [i, i+n).
// p1_sq: softmax(x) at T = 1 when the caller derived it already (rp.sq), else nullptr.
template <typename A>
inline Vectorized<A> add_ce_grad(Vectorized<A> g, const Vectorized<A>& xraw, const Vectorized<A>& ps,
                                 const RowParams<A>& rp, const LSE<A>& c1, int64_t i, int64_t n,
                                 int64_t label, const Vectorized<A>* p1_sq = nullptr) {
  using Vec = Vectorized<A>;
  if (!rp.need_ce) return g;
  const Vec p1 = p1_sq ? *p1_sq : rp.sep_ce ? vexp((xraw - Vec(c1.m)) - Vec(c1.l)) : ps;
  g = g + Vec(rp.ce_w) * p1;
  if (label >= i && label < i + n) {
    alignas(64) A tmp[Vec::size()];
    g.store(tmp);
    tmp[label - i] -= rp.ce_w;
    g = Vec::loadu(tmp);
  }
  return g;
}

// One full-vocabulary row. Returns the row loss; writes the gradient row if grad != nullptr.
template <int DIV, typename A, typename S, typename T>
A kd_row(const S* x, const T* t, int64_t V, int64_t label, const RowParams<A>& rp, S* grad) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  LSE<A> ct, cs, c1;
  stats_pass<A>(x, rp.need_div ? t : static_cast<const T*>(nullptr), V, rp, ct, cs, c1);
  const Vec vinv(rp.inv_t), vtm(ct.m), vtl(ct.l), vsm(cs.m), vsl(cs.l), vgc(rp.gcoef), vb(rp.beta),
      v1mb(rp.one_m_beta);
  const Vec zero(A(0));
  const bool grad_on = grad != nullptr;

  A div = 0;
  A gsum = 0;  // jsd: G = sum_j P_s_j g_j
  if (rp.need_div) {
    RowSum<A> lossv, gv;
    const bool fused_grad = grad_on && DIV == kForwardKL;
    // rp.sq: e = exp((x - m) / 2) gives both softmaxes, ps = e / sum_s and p1 = e^2 / sum_1 (c1.m == cs.m)
    const Vec vrs(std::exp(-cs.l)), vr1(std::exp(-c1.l));
    for (int64_t i = 0; i < V; i += W) {
      const int64_t n = std::min<int64_t>(W, V - i);
      const Vec xr = load<A>(x + i, n, neg_inf<A>());
      const Vec lpt = (load<A>(t + i, n, neg_inf<A>()) - vtm) * vinv - vtl;
      const Vec lps = (xr - vsm) * vinv - vsl;
      if constexpr (DIV == kForwardKL) {
        const Vec pt = vexp(lpt);
        lossv.add(masked(pt * (lpt - lps), pt != zero));
        if (fused_grad) {
          if (rp.sq) {
            const Vec e = vexp((xr - vsm) * vinv);
            const Vec ps = e * vrs;
            const Vec p1 = e * e * vr1;
            Vec g = vgc * (ps - pt);
            g = add_ce_grad(g, xr, ps, rp, c1, i, n, label, &p1);
            store(g, grad + i, n);
          } else {
            const Vec ps = vexp(lps);
            Vec g = vgc * (ps - pt);
            g = add_ce_grad(g, xr, ps, rp, c1, i, n, label);
            store(g, grad + i, n);
          }
        }
      } else if constexpr (DIV == kReverseKL) {
        const Vec ps = vexp(lps);
        lossv.add(masked(ps * (lps - lpt), ps != zero));
      } else {
        const Vec pt = vexp(lpt);
        const Vec ps = vexp(lps);
        const Vec lm = (vb * pt + v1mb * ps).log();
        lossv.add(vb * masked(pt * (lpt - lm), pt != zero) + v1mb * masked(ps * (lps - lm), ps != zero));
        if (grad_on) gv.add(masked(ps * (v1mb * (lps - lm)), ps != zero));
      }
    }
    div = lossv.get();
    gsum = gv.get();
  }

  A loss = rp.need_div ? rp.coef * div : A(0);
  if (rp.need_ce) loss += rp.ce_w * ((c1.m - static_cast<A>(x[label])) + c1.l);

  const bool grad_done = rp.need_div && DIV == kForwardKL;
  if (grad_on && !grad_done) {
    const Vec vd(div), vg(gsum);
    for (int64_t i = 0; i < V; i += W) {
      const int64_t n = std::min<int64_t>(W, V - i);
      const Vec xr = load<A>(x + i, n, neg_inf<A>());
      const Vec lps = (xr - vsm) * vinv - vsl;
      Vec ps = zero;
      Vec g = zero;
      if (rp.need_div) {
        ps = vexp(lps);
        const Vec lpt = (load<A>(t + i, n, neg_inf<A>()) - vtm) * vinv - vtl;
        if constexpr (DIV == kReverseKL) {
          g = vgc * masked(ps * (lps - lpt - vd), ps != zero);
        } else if constexpr (DIV == kJSD) {
          const Vec pt = vexp(lpt);
          const Vec lm = (vb * pt + v1mb * ps).log();
          g = vgc * masked(ps * (v1mb * (lps - lm) - vg), ps != zero);
        }
      } else if (rp.need_ce && !rp.sep_ce) {
        ps = vexp(lps);
      }
      g = add_ce_grad(g, xr, ps, rp, c1, i, n, label);
      store(g, grad + i, n);
    }
  }
  return loss;
}

// Student mass outside the k entries, sum_{i not in idx} P_s_i, summed directly over those entries (not as
// 1 - mass on the k entries, which loses everything below float's 1e-7 to cancellation). `outside` is a
// per-thread scratch row of V ones; the k entries are zeroed for the pass and restored after it.
template <typename A, typename S>
A student_rest_mass(const S* x, const int64_t* idx, int64_t V, int64_t K, A inv_t, const LSE<A>& cs) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  thread_local std::vector<A> outside;
  if (static_cast<int64_t>(outside.size()) < V) outside.assign(static_cast<size_t>(V), A(1));
  for (int64_t j = 0; j < K; ++j) outside[idx[j]] = A(0);
  const Vec vinv(inv_t), vsm(cs.m), vsl(cs.l), zero(A(0));
  RowSum<A> rest;
  for (int64_t i = 0; i < V; i += W) {
    const int64_t n = std::min<int64_t>(W, V - i);
    const Vec ps = vexp((load<A>(x + i, n, neg_inf<A>()) - vsm) * vinv - vsl);
    rest.add(masked(ps, load<A>(outside.data() + i, n, A(0)) != zero));
  }
  for (int64_t j = 0; j < K; ++j) outside[idx[j]] = A(1);
  return rest.get();
}

// One top-k row: teacher distribution over k (logit, index) pairs, student over the full vocabulary.
// Indices are assumed distinct within a row.
//
// tail (nullptr: none): log R, the teacher's probability mass outside the k entries at this temperature.
// The teacher is then (1 - R) softmax(tk / T) on the k entries plus a "rest" bucket of mass R, compared
// with the student's k probabilities and its rest mass Q = sum of P_s outside the k entries:
//   forward_kl: sum_j P_j (log P_j - log P_s_j) + R (log R - log Q)
//   jsd:        the same buckets, M_rest = beta R + (1 - beta) Q
// d loss / d x_i outside the k entries: coef/T * P_s_i * (1 - R/Q) (forward_kl), coef/T * P_s_i * (g_rest - G)
// (jsd, g_rest = (1-beta)(log Q - log M_rest)): the teacher's rest mass spread like the student's.
template <int DIV, typename A, typename S, typename T>
A kd_topk_row(const S* x, const T* tk, const int64_t* idx, int64_t V, int64_t K, int64_t label,
              const RowParams<A>& rp, S* grad, const A* tail) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  LSE<A> ct, cs, c1;
  stats_pass<A>(x, static_cast<const T*>(nullptr), V, rp, ct, cs, c1);
  // Teacher log-sum-exp over the k entries.
  A div = 0, gsum = 0, c_out = 0;
  A base = rp.gcoef;  // gradient factor of P_s_i outside the k entries
  A lw = 0;           // log(1 - R): the teacher's log mass on the k entries
  if (rp.need_div) {
    A mx = neg_inf<A>();
    bool nan = false;
    for (int64_t j = 0; j < K; ++j) {
      const A a = static_cast<A>(tk[j]);
      nan |= std::isnan(a);
      mx = std::max(mx, a);
    }
    if (nan || !std::isfinite(mx)) {
      ct.m = ct.l = std::numeric_limits<A>::quiet_NaN();
    } else {
      A z = 0;
      for (int64_t j = 0; j < K; ++j) z += std::exp((static_cast<A>(tk[j]) - mx) * rp.inv_t);
      ct.m = mx;
      ct.l = std::log(z);
    }
    A r_t = 0, lr_t = neg_inf<A>(), q_rest = 0;  // teacher rest mass R, log R; student rest mass Q
    if (tail != nullptr) {
      lr_t = *tail;
      r_t = std::exp(lr_t);
      lw = std::log(-std::expm1(lr_t));  // NaN for log R > 0 or NaN: the row's loss is NaN
      q_rest = student_rest_mass<A>(x, idx, V, K, rp.inv_t, cs);
    }
    A ps_k = 0;  // student mass on the k entries (jsd)
    for (int64_t j = 0; j < K; ++j) {
      const A lpt = (static_cast<A>(tk[j]) - ct.m) * rp.inv_t - ct.l + lw;
      const A lps = (static_cast<A>(x[idx[j]]) - cs.m) * rp.inv_t - cs.l;
      const A pt = std::exp(lpt);
      if constexpr (DIV == kForwardKL) {
        if (pt != 0) div += pt * (lpt - lps);
      } else {
        const A ps = std::exp(lps);
        const A lm = std::log(rp.beta * pt + rp.one_m_beta * ps);
        if (pt != 0) div += rp.beta * pt * (lpt - lm);
        if (ps != 0) {
          div += rp.one_m_beta * ps * (lps - lm);
          gsum += ps * rp.one_m_beta * (lps - lm);
        }
        ps_k += ps;
      }
    }
    if (tail != nullptr) {  // the rest bucket (R != 0 is also true for a NaN tail: the row is NaN)
      const A lq = std::log(q_rest);
      if constexpr (DIV == kForwardKL) {
        if (r_t != 0) div += r_t * (lr_t - lq);
        base = q_rest > 0 ? rp.gcoef * (A(1) - r_t / q_rest) : rp.gcoef;
      } else {
        const A lm = std::log(rp.beta * r_t + rp.one_m_beta * q_rest);
        if (r_t != 0) div += rp.beta * r_t * (lr_t - lm);
        c_out = q_rest > 0 ? rp.one_m_beta * (lq - lm) : A(0);  // g_rest
        div += q_rest * c_out;
        gsum += q_rest * c_out;
      }
    } else if constexpr (DIV == kJSD) {
      // Outside the k entries M = (1-beta) P_s: KL(P_s||M) there is -P_s log(1-beta).
      c_out = -rp.one_m_beta * std::log(rp.one_m_beta);  // g_i outside the k entries
      const A rest = std::max(A(0), A(1) - ps_k);
      div += rest * c_out;  // (1-beta) * rest * (-log(1-beta))
      gsum += rest * c_out;
    }
    if constexpr (DIV == kJSD) base = rp.gcoef * (c_out - gsum);
  }
  A loss = rp.need_div ? rp.coef * div : A(0);
  if (rp.need_ce) loss += rp.ce_w * ((c1.m - static_cast<A>(x[label])) + c1.l);

  if (grad != nullptr) {
    const Vec vinv(rp.inv_t), vsm(cs.m), vsl(cs.l), zero(A(0));
    const Vec vbase(base);
    for (int64_t i = 0; i < V; i += W) {
      const int64_t n = std::min<int64_t>(W, V - i);
      const Vec xr = load<A>(x + i, n, neg_inf<A>());
      Vec ps = zero, g = zero;
      if (rp.need_div || (rp.need_ce && !rp.sep_ce)) ps = vexp((xr - vsm) * vinv - vsl);
      if (rp.need_div) g = tail != nullptr ? masked(vbase * ps, ps != zero) : vbase * ps;
      g = add_ce_grad(g, xr, ps, rp, c1, i, n, label);
      store(g, grad + i, n);
    }
    if (rp.need_div) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t v = idx[j];
        const A xv = static_cast<A>(x[v]);
        const A lps = (xv - cs.m) * rp.inv_t - cs.l;
        const A ps = std::exp(lps);
        const A pt = std::exp((static_cast<A>(tk[j]) - ct.m) * rp.inv_t - ct.l + lw);
        A g;
        if constexpr (DIV == kForwardKL) {
          g = rp.gcoef * (ps - pt);
        } else {
          const A lm = std::log(rp.beta * pt + rp.one_m_beta * ps);
          g = ps != 0 ? rp.gcoef * ps * (rp.one_m_beta * (lps - lm) - gsum) : A(0);
        }
        if (rp.need_ce) {
          const A p1 = rp.sep_ce ? std::exp((xv - c1.m) - c1.l) : ps;
          g += rp.ce_w * (p1 - (v == label ? A(1) : A(0)));
        }
        grad[v] = static_cast<S>(g);
      }
    }
  }
  return loss;
}

// ---------------------------------------------------------------------------------------------------
// AVX512 (16 lanes) kernel for float32 rows, forward_kl: selected at run time on hosts with AVX512F
// (RAYDISTILL_KD_ISA=avx2 forces the at::vec path above). Same algorithm as kd_row; at T = 2 with CE
// the softmax at T = 1 is derived by squaring exp((x - m) / 2), which saves one exp per element and pass.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RAYDISTILL_KD_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,fma,avx2")

namespace z16 {

constexpr int64_t W = 16;

// exp(x) to ~2e-7 relative: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r, scaled by 2^n
// with vscalefps (exact, saturates to 0 / inf). NaN propagates; -inf -> 0.
static inline __attribute__((always_inline)) __m512 vexp(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.f), x);  // second operand NaN -> NaN
  x = _mm512_min_ps(_mm512_set1_ps(100.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

static inline __attribute__((always_inline)) __m512 load(const float* p, int64_t n) {
  if (n >= W) return _mm512_loadu_ps(p);
  const __mmask16 k = static_cast<__mmask16>((1u << n) - 1u);
  return _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), k, p);
}

static inline __attribute__((always_inline)) void store(float* p, __m512 v, int64_t n) {
  if (n >= W) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), v);
  }
}

// Per-lane online softmax of v * scale (max in raw units), Kahan-compensated sums. With SQ, a second
// sum s2 of exp(v - m) (scale 1) is kept from the squares of exp((v - m) / 2) (scale must be 0.5).
template <bool SQ>
struct Online {
  __m512 m, s, c, s2, c2;
  Online() {
    m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    s = c = s2 = c2 = _mm512_setzero_ps();
  }

  static inline __attribute__((always_inline)) void kahan(__m512& s, __m512& c, __m512 r, __m512 chunk) {
    const __m512 sr = _mm512_mul_ps(s, r);
    const __m512 y = _mm512_sub_ps(chunk, _mm512_mul_ps(c, r));
    const __m512 tt = _mm512_add_ps(sr, y);
    c = _mm512_sub_ps(_mm512_sub_ps(tt, sr), y);
    s = tt;
  }

  template <int U>
  inline __attribute__((always_inline)) void add(const __m512* v, __m512 scale) {
    __m512 cm = v[0];
    for (int u = 1; u < U; ++u) cm = _mm512_max_ps(cm, v[u]);  // NaN: caught by the sums below
    const __m512 nm = _mm512_max_ps(m, cm);
    const __mmask16 allneg = _mm512_cmp_ps_mask(nm, _mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                                _CMP_EQ_OQ);
    const __m512 safe = _mm512_mask_mov_ps(nm, allneg, _mm512_setzero_ps());
    const __m512 r = vexp(_mm512_mul_ps(_mm512_sub_ps(m, safe), scale));
    __m512 e = vexp(_mm512_mul_ps(_mm512_sub_ps(v[0], safe), scale));
    __m512 chunk = e;
    __m512 chunk2 = _mm512_mul_ps(e, e);
    for (int u = 1; u < U; ++u) {
      e = vexp(_mm512_mul_ps(_mm512_sub_ps(v[u], safe), scale));
      chunk = _mm512_add_ps(chunk, e);
      if (SQ) chunk2 = _mm512_fmadd_ps(e, e, chunk2);
    }
    kahan(s, c, r, chunk);
    if (SQ) kahan(s2, c2, _mm512_mul_ps(r, r), chunk2);
    m = nm;
  }

  static LSE<float> finish_one(const float* mm, const float* ss, const float* cc, float scale) {
    const float nan_v = std::numeric_limits<float>::quiet_NaN();
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < W; ++k) {
      if (std::isnan(mm[k]) || std::isnan(ss[k])) return {nan_v, nan_v};
      mx = std::max(mx, mm[k]);
    }
    if (mx == -std::numeric_limits<float>::infinity()) return {nan_v, nan_v};
    if (mx == std::numeric_limits<float>::infinity()) return {nan_v, nan_v};
    double z = 0;
    for (int64_t k = 0; k < W; ++k)
      if (mm[k] != -std::numeric_limits<float>::infinity())
        z += (static_cast<double>(ss[k]) - cc[k]) * std::exp(static_cast<double>(mm[k] - mx) * scale);
    return {mx, static_cast<float>(std::log(z))};
  }

  inline void finish(float scale, LSE<float>& out, LSE<float>& out2) const {
    alignas(64) float mm[W], ss[W], cc[W];
    _mm512_store_ps(mm, m);
    _mm512_store_ps(ss, s);
    _mm512_store_ps(cc, c);
    out = finish_one(mm, ss, cc, scale);
    if (SQ) {
      _mm512_store_ps(ss, s2);
      _mm512_store_ps(cc, c2);
      out2 = finish_one(mm, ss, cc, 1.f);
    }
  }
};

static inline float hsum(__m512 v) {
  alignas(64) float tmp[W];
  _mm512_store_ps(tmp, v);
  float s = 0;
  for (int64_t k = 0; k < W; ++k) s += tmp[k];
  return s;
}

// SEP: CE needs its own softmax at T = 1; SQ: that softmax comes from squaring (inv_t == 0.5).
template <bool SEP, bool SQ>
float fkl_row(const float* x, const float* t, int64_t V, int64_t label, const RowParams<float>& rp,
              float* grad) {
  constexpr int U = 4;
  const __m512 vinv = _mm512_set1_ps(rp.inv_t), one = _mm512_set1_ps(1.f);
  Online<false> ot;
  Online<SQ> os;
  Online<false> o1;
  int64_t i = 0;
  for (; i + U * W <= V; i += U * W) {
    __m512 xv[U], tv[U];
    for (int u = 0; u < U; ++u) {
      xv[u] = _mm512_loadu_ps(x + i + u * W);
      tv[u] = _mm512_loadu_ps(t + i + u * W);
    }
    os.template add<U>(xv, vinv);
    ot.template add<U>(tv, vinv);
    if (SEP && !SQ) o1.template add<U>(xv, one);
  }
  for (; i < V; i += W) {
    const int64_t n = std::min<int64_t>(W, V - i);
    __m512 xv = load(x + i, n), tv = load(t + i, n);
    os.template add<1>(&xv, vinv);
    ot.template add<1>(&tv, vinv);
    if (SEP && !SQ) o1.template add<1>(&xv, one);
  }
  LSE<float> ct, cs, c1, dummy;
  ot.finish(rp.inv_t, ct, dummy);
  os.finish(rp.inv_t, cs, c1);
  if (SEP && !SQ) o1.finish(1.f, c1, dummy);
  if (!SEP) c1 = cs;

  const __m512 vtm = _mm512_set1_ps(ct.m), vtl = _mm512_set1_ps(ct.l), vsm = _mm512_set1_ps(cs.m),
               vsl = _mm512_set1_ps(cs.l), vgc = _mm512_set1_ps(rp.gcoef), vcw = _mm512_set1_ps(rp.ce_w),
               vc1m = _mm512_set1_ps(c1.m), vc1l = _mm512_set1_ps(c1.l),
               // SQ: ps = e * exp(-cs.l), p1 = e^2 * exp(-c1.l), e = exp((x - m) / 2)
               vels = _mm512_set1_ps(std::exp(-cs.l)), vel1 = _mm512_set1_ps(std::exp(-c1.l));
  const __m512 zero = _mm512_setzero_ps();
  __m512 part = zero;
  int cnt = 0;
  double total = 0;
  for (int64_t i = 0; i < V; i += W) {
    const int64_t n = std::min<int64_t>(W, V - i);
    const __m512 xr = load(x + i, n);
    const __m512 lpt = _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(load(t + i, n), vtm), vinv), vtl);
    const __m512 xs = _mm512_mul_ps(_mm512_sub_ps(xr, vsm), vinv);
    const __m512 lps = _mm512_sub_ps(xs, vsl);
    const __m512 pt = vexp(lpt);
    const __mmask16 nz = _mm512_cmp_ps_mask(pt, zero, _CMP_NEQ_UQ);
    part = _mm512_add_ps(part, _mm512_maskz_mul_ps(nz, pt, _mm512_sub_ps(lpt, lps)));
    if (++cnt == 16) {
      total += static_cast<double>(hsum(part));
      part = zero;
      cnt = 0;
    }
    if (grad != nullptr) {
      __m512 ps, p1;
      if (SQ) {
        const __m512 e = vexp(xs);
        ps = _mm512_mul_ps(e, vels);
        p1 = _mm512_mul_ps(_mm512_mul_ps(e, e), vel1);
      } else {
        ps = vexp(lps);
        p1 = SEP ? vexp(_mm512_sub_ps(_mm512_sub_ps(xr, vc1m), vc1l)) : ps;
      }
      __m512 g = _mm512_mul_ps(vgc, _mm512_sub_ps(ps, pt));
      if (rp.need_ce) g = _mm512_add_ps(g, _mm512_mul_ps(vcw, p1));
      store(grad + i, g, n);
    }
  }
  total += static_cast<double>(hsum(part));
  const float div = static_cast<float>(total);
  float loss = rp.coef * div;
  if (rp.need_ce) {
    loss += rp.ce_w * ((c1.m - x[label]) + c1.l);
    if (grad != nullptr) grad[label] -= rp.ce_w;
  }
  return loss;
}

}  // namespace z16

#pragma GCC pop_options
#endif

bool use_avx512() {
#ifdef RAYDISTILL_KD_AVX512
  static const bool ok = [] {
    const char* isa = std::getenv("RAYDISTILL_KD_ISA");
    if (isa != nullptr && std::string(isa) == "avx2") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return ok;
#else
  return false;
#endif
}

// float32 forward_kl rows on the AVX512 kernel; false if this call is not one of those.
bool fkl_row_avx512(const float* x, const float* t, int64_t V, int64_t label, const RowParams<float>& rp,
                    float* grad, float& loss) {
#ifdef RAYDISTILL_KD_AVX512
  if (!rp.need_div) return false;
  if (!rp.need_ce) {
    loss = z16::fkl_row<false, false>(x, t, V, label, rp, grad);
  } else if (!rp.sep_ce) {
    loss = z16::fkl_row<false, false>(x, t, V, label, rp, grad);
  } else if (rp.inv_t == 0.5f) {
    loss = z16::fkl_row<true, true>(x, t, V, label, rp, grad);
  } else {
    loss = z16::fkl_row<true, false>(x, t, V, label, rp, grad);
  }
  return true;
#else
  return false;
#endif
}

template <typename F>
void dispatch_reduced(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "kd_loss: unexpected dtype ", st);
  }
}

template <typename F>
void dispatch_div(int64_t div, F&& f) {
  switch (div) {
    case kForwardKL: f(std::integral_constant<int, kForwardKL>{}); break;
    case kReverseKL: f(std::integral_constant<int, kReverseKL>{}); break;
    default: f(std::integral_constant<int, kJSD>{}); break;
  }
}

void check_label_range(const at::Tensor& lab, int64_t V, int64_t ignore_index) {
  if (!lab.defined()) return;
  const int64_t* l = lab.data_ptr<int64_t>();
  for (int64_t r = 0; r < lab.numel(); ++r) {
    TORCH_CHECK_VALUE(l[r] == ignore_index || (l[r] >= 0 && l[r] < V), "kd_loss: labels must be in [0, ", V,
                      ") or equal ignore_index=", ignore_index, "; got ", l[r], " at row ", r);
  }
}

// Runs `row(r, x_row, t_row, grad_row, label) -> loss` over all rows in parallel.
template <typename A, typename S, typename Row>
void for_rows(int64_t rows, int64_t V, const at::Tensor& lab, int64_t ignore_index, A* loss, S* grad,
              Row&& row) {
  const int64_t* l = lab.defined() ? lab.data_ptr<int64_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t label = l ? l[r] : -1;
      S* g = grad ? grad + r * V : nullptr;
      if (l && label == ignore_index) {
        loss[r] = 0;
        if (g) std::fill(g, g + V, static_cast<S>(0));
        continue;
      }
      loss[r] = row(r, label, g);
    }
  });
}

// grad_out (the *_out ops): a caller-owned (rows, V) buffer of the student's dtype that receives the
// gradient, so a chunked caller (kd_loss_linear) reuses one buffer instead of page-faulting a fresh one
// per chunk. It must not overlap the inputs.
at::Tensor grad_buffer(const at::Tensor* grad_out, const at::Tensor& student_in, const at::Tensor& student,
                       int64_t rows, int64_t V) {
  if (grad_out == nullptr) return at::empty({rows, V}, student.options());
  TORCH_CHECK_VALUE(grad_out->dim() == 2 && grad_out->size(0) == rows && grad_out->size(1) == V &&
                        grad_out->is_contiguous(),
                    "kd_loss: grad_out must be a contiguous (", rows, ", ", V, ") tensor, got ", grad_out->sizes());
  TORCH_CHECK_TYPE(grad_out->scalar_type() == student_in.scalar_type() && grad_out->device() == student_in.device(),
                   "kd_loss: grad_out must have the student logits' dtype and device");
  TORCH_CHECK_VALUE(at::get_overlap_status(*grad_out, student_in) == at::MemOverlapStatus::No,
                    "kd_loss: grad_out must not overlap student_logits");
  return grad_out->scalar_type() == student.scalar_type() ? *grad_out : at::empty({rows, V}, student.options());
}

at::Tensor finish_grad(const at::Tensor* grad_out, at::Tensor grad, const at::Tensor& student_in) {
  if (grad_out != nullptr) {
    if (!grad.is_same(*grad_out)) grad_out->copy_(grad);
    return *grad_out;
  }
  return grad.scalar_type() != student_in.scalar_type() ? grad.to(student_in.scalar_type()) : grad;
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_impl(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                    const std::optional<at::Tensor>& labels, double temperature,
                                                    double alpha, int64_t divergence, double beta,
                                                    int64_t ignore_index, bool t2_scaling, bool compute_grad,
                                                    const std::optional<at::Tensor>& scale,
                                                    const at::Tensor* grad_out) {
  check_scalars(temperature, alpha, divergence, beta);
  check_logits(student_in, "student_logits");
  check_logits(teacher_in, "teacher_logits");
  TORCH_CHECK_VALUE(student_in.sizes() == teacher_in.sizes(), "kd_loss: teacher_logits shape ",
                    teacher_in.sizes(), " must match student_logits shape ", student_in.sizes());
  const int64_t rows = student_in.size(0), V = student_in.size(1);
  TORCH_CHECK_VALUE(V >= 1, "kd_loss: the vocabulary dimension must be >= 1");
  at::Tensor lab = prepare_labels(labels, rows, alpha, student_in.device());
  check_label_range(lab, V, ignore_index);
  const bool dbl = student_in.scalar_type() == at::kDouble || teacher_in.scalar_type() == at::kDouble;
  at::Tensor student = dbl ? student_in.to(at::kDouble) : student_in;
  at::Tensor teacher = dbl ? teacher_in.to(at::kDouble) : teacher_in;
  student = unit_last_stride(student);  // rows may be strided (slices), the vocabulary may not
  teacher = unit_last_stride(teacher);
  const int64_t sx = row_stride(student), st = row_stride(teacher);
  KDParams p = make_params(temperature, alpha, divergence, beta, ignore_index, t2_scaling,
                           lab.defined(), compute_grad);
  fold_scale(p, prepare_scale(scale, student_in.device()));
  at::Tensor loss = at::empty({rows}, student_in.options().dtype(dbl ? at::kDouble : at::kFloat));
  at::Tensor grad = compute_grad ? grad_buffer(grad_out, student_in, student, rows, V)
                                 : at::empty({0}, student_in.options());
  if (rows == 0) return {loss, compute_grad ? finish_grad(grad_out, grad, student_in) : grad};

  auto run = [&](auto a_tag, auto s_tag, auto t_tag) {
    using A = decltype(a_tag);
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    const S* xs = student.data_ptr<S>();
    const T* ts = teacher.data_ptr<T>();
    A* lp = loss.data_ptr<A>();
    S* gp = compute_grad ? grad.data_ptr<S>() : nullptr;
    dispatch_div(divergence, [&](auto div_c) {
      constexpr int DIV = decltype(div_c)::value;
      if constexpr (DIV == kForwardKL && std::is_same_v<A, float> && std::is_same_v<S, float> &&
                    std::is_same_v<T, float>) {
        if (use_avx512() && p.coef != 0) {
          for_rows<A, S>(rows, V, lab, ignore_index, lp, gp, [&](int64_t r, int64_t label, S* g) {
            const RowParams<A> rp = row_params<A>(p, lab.defined());
            float out = 0;
            if (fkl_row_avx512(xs + r * sx, ts + r * st, V, label, rp, g, out)) return out;
            return kd_row<DIV, A, S, T>(xs + r * sx, ts + r * st, V, label, rp, g);
          });
          return;
        }
      }
      for_rows<A, S>(rows, V, lab, ignore_index, lp, gp, [&](int64_t r, int64_t label, S* g) {
        const RowParams<A> rp = row_params<A>(p, lab.defined());
        return kd_row<DIV, A, S, T>(xs + r * sx, ts + r * st, V, label, rp, g);
      });
    });
  };
  if (dbl) {
    run(double{}, double{}, double{});
  } else {
    dispatch_reduced(student.scalar_type(), [&](auto s_tag) {
      dispatch_reduced(teacher.scalar_type(), [&](auto t_tag) { run(float{}, s_tag, t_tag); });
    });
  }
  if (compute_grad) grad = finish_grad(grad_out, grad, student_in);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_fwd_impl(
    const at::Tensor& student_in, const at::Tensor& topk_in, const at::Tensor& indices_in,
    const std::optional<at::Tensor>& labels, double temperature, double alpha, int64_t divergence, double beta,
    int64_t ignore_index, bool t2_scaling, bool compute_grad, const std::optional<at::Tensor>& scale,
    const at::Tensor* grad_out, const std::optional<at::Tensor>& tail_in) {
  check_scalars(temperature, alpha, divergence, beta);
  TORCH_CHECK_VALUE(divergence != kReverseKL,
                    "kd_loss_topk: divergence reverse_kl is not supported with a top-k teacher");
  check_logits(student_in, "student_logits");
  check_logits(topk_in, "teacher_topk_logits");
  TORCH_CHECK_TYPE(indices_in.scalar_type() == at::kLong || indices_in.scalar_type() == at::kInt,
                   "kd_loss_topk: teacher_topk_indices must be int64 or int32, got ", indices_in.scalar_type());
  const int64_t rows = student_in.size(0), V = student_in.size(1);
  TORCH_CHECK_VALUE(V >= 1, "kd_loss: the vocabulary dimension must be >= 1");
  TORCH_CHECK_VALUE(topk_in.size(0) == rows && topk_in.size(1) >= 1,
                    "kd_loss_topk: teacher_topk_logits must have shape (", rows, ", k>=1), got ", topk_in.sizes());
  TORCH_CHECK_VALUE(indices_in.sizes() == topk_in.sizes(), "kd_loss_topk: teacher_topk_indices shape ",
                    indices_in.sizes(), " must match teacher_topk_logits shape ", topk_in.sizes());
  const int64_t K = topk_in.size(1);
  at::Tensor lab = prepare_labels(labels, rows, alpha, student_in.device());
  check_label_range(lab, V, ignore_index);
  at::Tensor idx = indices_in.to(at::kLong).contiguous();
  {
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t q = 0; q < idx.numel(); ++q)
      TORCH_CHECK_VALUE(ip[q] >= 0 && ip[q] < V, "kd_loss_topk: teacher_topk_indices must be in [0, ", V,
                        "), got ", ip[q]);
  }
  const bool dbl = student_in.scalar_type() == at::kDouble || topk_in.scalar_type() == at::kDouble;
  const at::Tensor tail = prepare_tail(tail_in, rows, student_in.device(), dbl ? at::kDouble : at::kFloat);
  if (tail.defined()) {
    const at::Tensor bad = at::isnan(tail) | (tail > 0);
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), "kd_loss_topk: teacher_topk_tail must be <= 0 (the log of a "
                      "probability mass <= 1) and not NaN; row ", bad.nonzero().select(1, 0)[0].item<int64_t>(),
                      " has ", at::masked_select(tail, bad)[0].item<double>());
  }
  at::Tensor student = unit_last_stride(dbl ? student_in.to(at::kDouble) : student_in);
  const int64_t sx = row_stride(student);
  at::Tensor topk = (dbl ? topk_in.to(at::kDouble) : topk_in).contiguous();
  KDParams p = make_params(temperature, alpha, divergence, beta, ignore_index, t2_scaling,
                           lab.defined(), compute_grad);
  fold_scale(p, prepare_scale(scale, student_in.device()));
  at::Tensor loss = at::empty({rows}, student_in.options().dtype(dbl ? at::kDouble : at::kFloat));
  at::Tensor grad = compute_grad ? grad_buffer(grad_out, student_in, student, rows, V)
                                 : at::empty({0}, student_in.options());
  if (rows == 0) return {loss, compute_grad ? finish_grad(grad_out, grad, student_in) : grad};
  const int64_t* ip = idx.data_ptr<int64_t>();

  auto run = [&](auto a_tag, auto s_tag, auto t_tag) {
    using A = decltype(a_tag);
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    const S* xs = student.data_ptr<S>();
    const T* ts = topk.data_ptr<T>();
    A* lp = loss.data_ptr<A>();
    S* gp = compute_grad ? grad.data_ptr<S>() : nullptr;
    const A* tp = tail.defined() ? tail.data_ptr<A>() : nullptr;
    dispatch_div(divergence, [&](auto div_c) {
      constexpr int DIV = decltype(div_c)::value;
      if constexpr (DIV != kReverseKL) {
        for_rows<A, S>(rows, V, lab, ignore_index, lp, gp, [&](int64_t r, int64_t label, S* g) {
          const RowParams<A> rp = row_params<A>(p, lab.defined());
          return kd_topk_row<DIV, A, S, T>(xs + r * sx, ts + r * K, ip + r * K, V, K, label, rp, g,
                                           tp ? tp + r : nullptr);
        });
      }
    });
  };
  if (dbl) {
    run(double{}, double{}, double{});
  } else {
    dispatch_reduced(student.scalar_type(), [&](auto s_tag) {
      dispatch_reduced(topk.scalar_type(), [&](auto t_tag) { run(float{}, s_tag, t_tag); });
    });
  }
  if (compute_grad) grad = finish_grad(grad_out, grad, student_in);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& labels, double temperature,
                                                   double alpha, int64_t divergence, double beta,
                                                   int64_t ignore_index, bool t2_scaling, bool compute_grad,
                                                   const std::optional<at::Tensor>& scale) {
  return kd_loss_fwd_impl(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, t2_scaling,
                          compute_grad, scale, nullptr);
}

at::Tensor kd_loss_fwd_out_cpu(const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& labels, double temperature, double alpha,
                               int64_t divergence, double beta, int64_t ignore_index, bool t2_scaling,
                               const std::optional<at::Tensor>& scale, at::Tensor& grad_out) {
  return std::get<0>(kd_loss_fwd_impl(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index,
                                      t2_scaling, true, scale, &grad_out));
}

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_fwd_cpu(
    const at::Tensor& student, const at::Tensor& topk, const at::Tensor& indices,
    const std::optional<at::Tensor>& labels, double temperature, double alpha, int64_t divergence, double beta,
    int64_t ignore_index, bool t2_scaling, bool compute_grad, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& tail) {
  return kd_loss_topk_fwd_impl(student, topk, indices, labels, temperature, alpha, divergence, beta, ignore_index,
                               t2_scaling, compute_grad, scale, nullptr, tail);
}

at::Tensor kd_loss_topk_fwd_out_cpu(const at::Tensor& student, const at::Tensor& topk, const at::Tensor& indices,
                                    const std::optional<at::Tensor>& labels, double temperature, double alpha,
                                    int64_t divergence, double beta, int64_t ignore_index, bool t2_scaling,
                                    const std::optional<at::Tensor>& scale, at::Tensor& grad_out,
                                    const std::optional<at::Tensor>& tail) {
  return std::get<0>(kd_loss_topk_fwd_impl(student, topk, indices, labels, temperature, alpha, divergence, beta,
                                           ignore_index, t2_scaling, true, scale, &grad_out, tail));
}

}  // namespace
}  // namespace kd
}  // namespace raydistill

TORCH_LIBRARY_FRAGMENT(raydistill, m) {
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? labels, float temperature, float alpha, "
      "int divergence, float beta, int ignore_index, bool t2_scaling, bool compute_grad, Tensor? scale=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "kd_loss_topk_fwd(Tensor student, Tensor teacher_topk, Tensor teacher_topk_indices, Tensor? labels, "
      "float temperature, float alpha, int divergence, float beta, int ignore_index, bool t2_scaling, "
      "bool compute_grad, Tensor? scale=None, Tensor? teacher_topk_tail=None) -> (Tensor, Tensor)");
  // CPU only: the gradient goes into a caller-owned buffer (kd_loss_linear's chunks); returns the row losses.
  m.def(
      "kd_loss_fwd_out(Tensor student, Tensor teacher, Tensor? labels, float temperature, float alpha, "
      "int divergence, float beta, int ignore_index, bool t2_scaling, Tensor? scale, Tensor(a!) grad_out) "
      "-> Tensor");
  m.def(
      "kd_loss_topk_fwd_out(Tensor student, Tensor teacher_topk, Tensor teacher_topk_indices, Tensor? labels, "
      "float temperature, float alpha, int divergence, float beta, int ignore_index, bool t2_scaling, "
      "Tensor? scale, Tensor(a!) grad_out, Tensor? teacher_topk_tail=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(raydistill, CPU, m) {
  m.impl("kd_loss_fwd", &raydistill::kd::kd_loss_fwd_cpu);
  m.impl("kd_loss_topk_fwd", &raydistill::kd::kd_loss_topk_fwd_cpu);
  m.impl("kd_loss_fwd_out", &raydistill::kd::kd_loss_fwd_out_cpu);
  m.impl("kd_loss_topk_fwd_out", &raydistill::kd::kd_loss_topk_fwd_out_cpu);
}
