// Extract's layer fits (docs/tools.md#extract): the factors of one weight difference D (O, I, *K) at a given
// rank, in the algorithm's own factor structs (functional::<algo>::Weights) with the alpha extract stores.
// They name no tensor: the file's names come from the module's writer (lora_file_tensors, …), the one
// writer of each layout (docs/format.md#key-order).
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>

#include "lycoris/functional/loha.hpp"
#include "lycoris/functional/lokr.hpp"
#include "lycoris/functional/lora.hpp"
#include "lycoris/tools/extract.hpp"

namespace lycoris::tools {

// ShapeError unless D is a Linear or Conv1d/2d/3d weight difference (2 to 5 dims); `algo` names the caller.
void check_fit_input(const torch::Tensor& D, const char* algo);

// docs/tools.md#extract-locon: up = U_r·diag(σ_r) (O, r[, 1, …]), down = V_rᵀ (r, I, *K), alpha = r as a
// shape-(1,) tensor (s = 1); with options.tucker and a kernel ≠ 1, down (r', I, 1, …) and mid (r, r', *K) from
// the second SVD at r' = min(I, r), alpha = r'. With options.sparse_bias, the largest (1 − sparsity) fraction of
// the residual M − M̂ as COO (docs/format.md#sparse-bias); `note` says when its indices need int32.
struct LoConFactors {
  functional::lora::Weights weights;
  torch::Tensor alpha;
  torch::Tensor bias_indices, bias_values, bias_size;  // undefined without options.sparse_bias
  std::string note;
};
// docs/tools.md#extract-loha: (w1a·w1b) ⊙ (w2a·w2b) by alternating least squares, alpha = r (0-dim, s = 1).
struct LoHaFactors {
  functional::loha::Weights weights;
  torch::Tensor alpha;
};
// docs/tools.md#extract-lokr: w1 (a, c) and w2 (p, q, *K) whole, or w2a (p, r)·w2b (r, q·k) when
// r < max(p, q)/2; alpha = r (0-dim; s = 1 either way).
struct LoKrFactors {
  functional::lokr::Weights weights;
  torch::Tensor alpha;
};

// The fits at an explicit rank, in D's compute dtype (ShapeError for a rank outside the layer's limit, see
// fit_locon in extract.hpp).
LoConFactors fit_locon_factors(const torch::Tensor& D, int64_t rank, const ExtractOptions& options);
LoHaFactors fit_loha_factors(const torch::Tensor& D, int64_t rank, const ExtractOptions& options);
LoKrFactors fit_lokr_factors(const torch::Tensor& D, int64_t rank, const ExtractOptions& options);

// The Kronecker split of D (a·p, c·q, *K): (a, p) = factorization(O, factor), (c, q) = factorization(I, factor).
struct KronSplit {
  int64_t a, p, c, q;
};
KronSplit kron_split(const torch::Tensor& D, int64_t factor);
// Whether LoKr's fit at `rank` stores W2 whole (r ≥ max(p, q)/2, the writer's rule) rather than w2_a·w2_b.
bool lokr_stores_full_w2(const KronSplit& split, int64_t rank);
// D rearranged so that W1 ⊗ W2 becomes vec(W1)·vec(W2)ᵀ: R[(u,v), (x,y,κ)] = D[u·p+x, v·q+y, κ] (a·c, p·q·k).
torch::Tensor kron_rearrange(const torch::Tensor& D, const KronSplit& split);
// The nearest Kronecker product (Van Loan & Pitsianis): the top singular triple of R split evenly,
// W1 = √σ·u (a·c), W2 = √σ·v (p·q·k).
std::pair<torch::Tensor, torch::Tensor> nearest_kronecker(const torch::Tensor& R, const ExtractOptions& options);

}  // namespace lycoris::tools
