// LoKr (docs/format.md#lokr) as pure tensor math: ΔW = s · (W1 ⊗ W2) reshaped to W.shape, with
//   W1 (a, c) = lokr_w1 or lokr_w1_a·lokr_w1_b,
//   W2 (p, q, *K) = lokr_w2, or lokr_w2_a·lokr_w2_b (reshaped for convs), or the Tucker form
//   W2[x, y, κ] = Σ_{i,j} t2[i, j, κ] · w2_a[i, x] · w2_b[j, y];   O = a·p, I = c·q.
// Any device, any float dtype: math in functional::compute_dtype, result in the inputs' dtype.
#pragma once
#include <torch/types.h>

#include "lycoris/layer.hpp"

namespace lycoris::functional::lokr {

// Stored factors: either w1 or (w1a, w1b); either w2, or (w2a, w2b), or (w2a, w2b, t2) (Tucker).
// Shapes: w1 (a, c); w1a (a, r), w1b (r, c); w2 (p, q[, *K]); w2a (p, r), w2b (r, q·k);
// Tucker w2a (r, p), w2b (r, q), t2 (r, r, *K).
struct Weights {
  torch::Tensor w1, w1a, w1b, w2, w2a, w2b, t2;
};

// The layout a writer chooses (docs/format.md#lokr-layout "How the writer chooses the layout").
struct Layout {
  int64_t a = 1, c = 1, p = 1, q = 1;  // W1 (a, c), W2 (p, q, *K)
  bool w1_low_rank = false;            // lokr_w1_a/_b instead of lokr_w1
  bool w2_low_rank = false;            // lokr_w2_a/_b instead of lokr_w2
  bool tucker = false;                 // W2 in Tucker form (conv with a kernel size ≠ 1)
};
Layout choose_layout(const LayerSpec& layer, int64_t rank, int64_t factor, bool decompose_both, bool full_matrix,
                     bool unbalanced_factorization, bool tucker);

// Both Kronecker factors stored full: the scale is 1 and alpha is ignored.
bool both_full(const Weights& w);
// Rank for the scale alpha / r: lokr_w1_b rows if W1 is decomposed, else t2 rows (Tucker) or lokr_w2_b
// rows; 0 when both factors are full.
int64_t rank(const Weights& w);
// W1 (a, c) and W2 (p, q, *K) (or (p, q) for Linear) in the compute dtype.
torch::Tensor w1(const Weights& w);
torch::Tensor w2(const LayerSpec& layer, const Weights& w);
torch::Tensor diff_weight(const LayerSpec& layer, const Weights& w, double scale);
// ΔW·x by the Kronecker reshape trick: W2 acts on the input split (c, q) (as the host's conv for convs),
// then W1 mixes the c groups; never forms W1 ⊗ W2 nor a low-rank W2.
torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const Weights& w, double scale);
// Reference initialisation (docs/training.md#initialisation): w1 / w1a / w1b / w2a / t2 kaiming-uniform (a = √5);
// w2 and w2b zero, or kaiming-uniform with use_scalar.
Weights init_weights(const LayerSpec& layer, const Layout& layout, int64_t rank, bool use_scalar,
                     const torch::TensorOptions& options = {});

}  // namespace lycoris::functional::lokr
