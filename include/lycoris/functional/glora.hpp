// GLoRA (docs/format.md#glora, docs/training.md#algo-glora). With s = alpha / r, r = a2.shape[0]:
//   A = flat(a1)·flat(a2) (I×I),  B = reshape(flat(b1)·flat(b2), W.shape)
//   ΔW = s · (W·A + B)   where (W·A)[o, j, κ] = Σ_i W[o, i, κ]·A[i, j]      W' = W + m·ΔW
// ΔW depends on the host weight W it is applied to.
#pragma once
#include <torch/types.h>

#include <vector>

#include "lycoris/layer.hpp"

namespace lycoris::functional::glora {

struct Weights {
  torch::Tensor a1;  // (I, r[, 1, …])
  torch::Tensor a2;  // (r, I[, 1, …])
  torch::Tensor b1;  // (O, r[, 1, …])
  torch::Tensor b2;  // (r, I[, *K])
};

// Training-time dropouts of the bypass path (docs/training.md#dropout), all 0 outside training.
struct BypassDropout {
  double dropout = 0;       // inverted dropout on the outputs of a1 and b1
  double rank_dropout = 0;  // rank channels of a2(x) and b2(x), keep iff u > p (docs/loaders.md#q15-glora-rank-dropout-inverted fixed)
  bool rank_dropout_scale = false;
};

// The stored shapes for `layer` at rank r.
std::vector<int64_t> a1_shape(const LayerSpec& layer, int64_t r);
std::vector<int64_t> a2_shape(const LayerSpec& layer, int64_t r);
std::vector<int64_t> b1_shape(const LayerSpec& layer, int64_t r);
std::vector<int64_t> b2_shape(const LayerSpec& layer, int64_t r);

// ΔW = s·(W·A + B) in the compute dtype of W, returned in W's dtype.
torch::Tensor diff_weight(const torch::Tensor& W, const Weights& w, double s);
// W + m·ΔW.
torch::Tensor apply_weight(const torch::Tensor& W, const Weights& w, double s, double m);
// ΔW·x without building ΔW: m·s·( op(a1(a2(x)), W) + b1(op(x, b2)) ), s applied once (docs/loaders.md#q13-glora-bypass-double-scale),
// op = the host's linear/conv (stride, padding, dilation), a1/a2/b1 pointwise.
torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W, const Weights& w,
                          double s, double m, const BypassDropout& drop = {});
// Reference initialisation: a1, b1 Kaiming-uniform (a = √5); a2, b2 zero, or Kaiming-uniform with use_scalar.
Weights init_weights(const LayerSpec& layer, int64_t r, bool use_scalar, const torch::TensorOptions& options = {});

}  // namespace lycoris::functional::glora
