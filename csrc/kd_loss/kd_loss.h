// Shared definitions of the fused knowledge-distillation loss (CPU kernels, CUDA kernels, glue).
//
// Plain C++ (no torch headers) so that the CUDA kernels can include it under nvcc.
//
// Per row r with teacher logits t, student logits x, temperature T:
//   a = t / T, b = x / T, P_t = softmax(a), P_s = softmax(b), s = T^2 (t2_scaling) or 1
//   loss_r = alpha * s * D(P_t, P_s) + (1 - alpha) * CE(x, label_r)        (CE at temperature 1)
//   D = KL(P_t||P_s) | KL(P_s||P_t) | beta KL(P_t||M) + (1-beta) KL(P_s||M), M = beta P_t + (1-beta) P_s
// Rows whose label equals ignore_index have loss 0 and gradient 0.
//
// d loss_r / d x_i (what the fused op returns next to the loss, scaled later by the upstream grad):
//   forward_kl: coef/T * (P_s_i - P_t_i)
//   reverse_kl: coef/T * P_s_i * (r_i - D),   r_i = log P_s_i - log P_t_i
//   jsd:        coef/T * P_s_i * (g_i - G),   g_i = (1-beta)(log P_s_i - log M_i), G = sum_j P_s_j g_j
//   CE:         (1 - alpha) * (softmax(x)_i - [i == label])
// with coef = alpha * s. Terms with a zero probability factor are 0 (0 * log 0 = 0), so -inf logits
// (masked vocabulary) are fine.
#pragma once

#include <cstdint>

namespace raydistill {
namespace kd {

enum Divergence : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// Scalar parameters of one call, already folded (same for CPU and CUDA).
struct KDParams {
  double inv_temperature;  // 1 / T
  double coef;             // alpha * (T^2 if t2_scaling else 1); 0 -> no divergence term
  double ce_weight;        // 1 - alpha; 0 -> no cross-entropy term
  double beta;             // jsd mixing weight
  int64_t divergence;      // Divergence
  int64_t ignore_index;
  bool has_labels;
  bool compute_grad;
  bool temperature_is_one;  // CE can reuse the student softmax at T
};

inline KDParams make_params(double temperature, double alpha, int64_t divergence, double beta,
                            int64_t ignore_index, bool t2_scaling, bool has_labels, bool compute_grad) {
  KDParams p;
  p.inv_temperature = 1.0 / temperature;
  p.coef = alpha * (t2_scaling ? temperature * temperature : 1.0);
  p.ce_weight = 1.0 - alpha;
  p.beta = beta;
  p.divergence = divergence;
  p.ignore_index = ignore_index;
  p.has_labels = has_labels;
  p.compute_grad = compute_grad;
  p.temperature_is_one = temperature == 1.0;
  return p;
}

// I/O dtypes understood by the CUDA launcher (the glue maps torch dtypes onto these).
enum IODType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

}  // namespace kd
}  // namespace raydistill
