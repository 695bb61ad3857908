// LoHa (docs/format.md#loha) as pure tensor math.
//   ΔW = s · reshape((w1a·w1b) ⊙ (w2a·w2b), W.shape)                                    (no Tucker)
//   R_n[o, c, κ] = Σ_{i,j} t_n[i, j, κ] · wNa[i, o] · wNb[j, c],  ΔW = s · R_1 ⊙ R_2       (Tucker, convs)
// Any device, any float dtype: math in functional::compute_dtype, result in the inputs' dtype.
#pragma once
#include <torch/types.h>

#include "lycoris/functional/lora.hpp"
#include "lycoris/layer.hpp"

namespace lycoris::functional::loha {

// Shapes: no Tucker w1a (O, r), w1b (r, I·k), w2a (O, r), w2b (r, I·k);
// Tucker w1a (r, O), w1b (r, I), t1 (r, r, *K), and the same for w2a, w2b, t2.
struct Weights {
  torch::Tensor w1a, w1b, w2a, w2b, t1, t2;
};

torch::Tensor diff_weight(const LayerSpec& layer, const Weights& w, double scale);
// The Hadamard product of two rank-r products is a product of rank r²: A[o, (i,j)] = w1a[o,i]·w2a[o,j],
// B[(i,j), c] = w1b[i,c]·w2b[j,c] (Tucker: the cores multiply the same way). Returned as LoRA factors.
lora::Weights as_lora(const LayerSpec& layer, const Weights& w);
// ΔW·x through the rank-r² LoRA form (never materialises ΔW).
torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const Weights& w, double scale);
// True when the rank-r² path costs fewer multiply-adds per output position than ΔW·x with ΔW built.
bool bypass_is_cheaper(const LayerSpec& layer, const Weights& w);
// Reference initialisation (docs/training.md#initialisation): w1a N(0, 0.1), w1b N(0, 1), w2a 0 (N(0, 0.1) with
// use_scalar), w2b N(0, 1), t1/t2 N(0, 0.1).
Weights init_weights(const LayerSpec& layer, int64_t rank, bool tucker, bool use_scalar,
                     const torch::TensorOptions& options = {});

}  // namespace lycoris::functional::loha
