// GLoKr, the generalized Kronecker adapter (docs/glokr.md), as pure tensor math. For a host weight W of
// shape (O, I, *K):
//   A = A1 ⊗ A2 (I × I), (p, q) = factorization(I, factor), A1 (p, p), A2 (q, q) or A2a (q, r)·A2b (r, q);
//   B = B1 ⊗ B2 laid out exactly like a LoKr ΔW of the layer (docs/format.md#lokr);
//   ΔW = s · (W ×_in A + B),  (W ×_in A)[o, j, κ] = Σ_i W[o, i, κ] · A[i, j].
// Both parts reuse functional::lokr: A is a LoKr "delta" of the Linear I → I map (channel_spec), B the
// LoKr delta of the host layer. Any device, any float dtype: math in compute_dtype, result in W's dtype.
#pragma once
#include <torch/types.h>

#include "lycoris/functional/lokr.hpp"
#include "lycoris/layer.hpp"

namespace lycoris::functional::glokr {

// a: w1 = A1, w2 = A2 or (w2a, w2b) = (A2a, A2b); never w1a/w1b/t2.   b: any LoKr layout of the host.
struct Weights {
  lokr::Weights a, b;
};

struct Layout {
  lokr::Layout a;  // a = c = p, p = q of the input factorization; w2_low_rank iff 2r < q and not full_matrix
  lokr::Layout b;  // lokr::choose_layout of the host layer
};
Layout choose_layout(const LayerSpec& layer, int64_t rank, int64_t factor, bool decompose_both, bool full_matrix,
                     bool unbalanced_factorization, bool tucker);

// The Linear I → I layer A acts as (on the host's input-channel axis).
LayerSpec channel_spec(const LayerSpec& layer);
// No factor is low-rank (A2 full and both B factors full): s = 1 and alpha is ignored.
bool all_full(const Weights& w);
// Rank for s = alpha / r: A2b rows if A2 is low-rank, else the LoKr rank of B; 0 when all_full.
int64_t rank(const Weights& w);
// A = A1 ⊗ A2 (I × I) (for tests and inspection; neither diff_weight nor bypass_diff forms it).
torch::Tensor a_matrix(const LayerSpec& layer, const Weights& w);
// ΔW = scale · (W ×_in A + B), W ×_in A by the reshape trick on W's rows (Aᵀ = A1ᵀ ⊗ A2ᵀ), computed in the compute dtype of W, returned in the factors' dtype (as LoKr).
torch::Tensor diff_weight(const LayerSpec& layer, const Weights& w, const torch::Tensor& W, double scale);
// ΔW·x without forming A, B or ΔW: W (no bias) applied to scale·(A x), where A x is the LoKr reshape trick
// on the channel axis, plus the LoKr bypass of scale·B. In x's dtype.
torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const Weights& w, const torch::Tensor& W,
                          double scale);
// Initialisation: A1, A2a, B1 (and its factors), B2a / t2 kaiming-uniform (a = √5); A2 (or A2b) and B2 (or
// B2b) zero, so ΔW = 0 at step 0 — or kaiming-uniform too with use_scalar (the zero scalar does it).
Weights init_weights(const LayerSpec& layer, const Layout& layout, int64_t rank, bool use_scalar,
                     const torch::TensorOptions& options = {});

}  // namespace lycoris::functional::glokr
