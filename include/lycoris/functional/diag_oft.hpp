// Diag-OFT (docs/format.md#diag-oft): N blocks of size S over the output rows (N·S = O), each rotated by the
// TRANSPOSE of its interpolated Cayley rotation (docs/loaders.md#q16-oft-rotation-direction), then the optional per-row rescale:
//   W'_n = M_nᵀ · W_n,  M_n = m·R_n + (1 − m)·I,  W'[o] *= rescale[o] (not interpolated, docs/loaders.md#q19-rescale-ignores-multiplier)
// The bias is never rotated.
#pragma once
#include <torch/types.h>

#include <utility>
#include <vector>

#include "lycoris/layer.hpp"

namespace lycoris::functional::diag_oft {

// (S, N) for a fresh adapter: (S, N) = factorization(O, rank), S the smaller factor (docs/loaders.md#q17-diag-oft-block-size).
std::pair<int64_t, int64_t> block_layout(int64_t out_features, int64_t rank);
// Rows X (O, …) rotated block-wise by Mᵀ: X'[n·S + a] = Σ_b M_n[b, a]·X[n·S + b]. M is (N, S, S).
torch::Tensor rotate_rows(const torch::Tensor& X, const torch::Tensor& M);
// The per-block matrices M (N, S, S) at multiplier m, in the compute dtype of `like`.
torch::Tensor matrices(const torch::Tensor& blocks, double constraint, int64_t out_features, double m,
                       const torch::Tensor& like, double dropout = 0);
// W' (rescale may be undefined), computed in the compute dtype of W, returned in W's dtype.
torch::Tensor apply_weight(const torch::Tensor& W, const torch::Tensor& blocks, const torch::Tensor& rescale,
                           double constraint, double m, double dropout = 0);
// ΔW = W' − W.
torch::Tensor diff_weight(const torch::Tensor& W, const torch::Tensor& blocks, const torch::Tensor& rescale,
                          double constraint, double m);
// The adapted output without building W': the host op's output (no bias) rotated on its channel axis,
// rescaled, then the bias added unrotated — equal to op(x, W') + b.
torch::Tensor bypass_forward(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                             const torch::Tensor& b, const torch::Tensor& blocks, const torch::Tensor& rescale,
                             double constraint, double m, double dropout = 0);
// Reference initialisation: blocks zero (N, S, S) (R = I); rescale ones (O, 1, …) when `rescaled`.
std::pair<torch::Tensor, torch::Tensor> init_weights(const LayerSpec& layer, int64_t rank, bool rescaled,
                                                     const torch::TensorOptions& options = {});
// Shape of `rescale` for the layer: (O, 1, …, 1) with W's number of dims.
std::vector<int64_t> rescale_shape(const LayerSpec& layer);

}  // namespace lycoris::functional::diag_oft
