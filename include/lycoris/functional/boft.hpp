// BOFT (docs/format.md#boft): M = log2(N) + 1 butterfly stages of N blocks of size S (N·S = O). Stage i,
// with h = 2^i·S/2, interleaves the two halves of every group of 2h output rows (offset g·h + j → 2j + g),
// applies blockdiag(G_i,0 … G_i,N−1) UN-transposed (docs/loaders.md#q16-oft-rotation-direction), and undoes the interleave:
//   X ← P_iᵀ · blockdiag(G_i) · P_i · X,   X₀ = W,   G = m·R + (1 − m)·I,   then X[o] *= rescale[o].
// The bias is never rotated.
#pragma once
#include <torch/types.h>

#include <optional>
#include <utility>

#include "lycoris/layer.hpp"

namespace lycoris::functional::boft {

// (S, N) = power2factorization(O, rank) for a fresh adapter, or nullopt (docs/loaders.md#q22-boft-layout).
std::optional<std::pair<int64_t, int64_t>> block_layout(int64_t out_features, int64_t rank);
// Rows X (O, …) through every stage with the matrices G (M, N, S, S).
torch::Tensor butterfly_rows(const torch::Tensor& X, const torch::Tensor& G);
// G (M, N, S, S) at multiplier m, in the compute dtype of `like`.
torch::Tensor matrices(const torch::Tensor& blocks, double constraint, int64_t out_features, double m,
                       const torch::Tensor& like);
// W' (rescale may be undefined), computed in the compute dtype of W, returned in W's dtype.
torch::Tensor apply_weight(const torch::Tensor& W, const torch::Tensor& blocks, const torch::Tensor& rescale,
                           double constraint, double m);
// ΔW = W' − W.
torch::Tensor diff_weight(const torch::Tensor& W, const torch::Tensor& blocks, const torch::Tensor& rescale,
                          double constraint, double m);
// The adapted output without building W': the host op's output (no bias) sent through the butterfly on
// its channel axis, rescaled, then the bias added — equal to op(x, W') + b.
torch::Tensor bypass_forward(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                             const torch::Tensor& b, const torch::Tensor& blocks, const torch::Tensor& rescale,
                             double constraint, double m);
// Reference initialisation: blocks zero (M, N, S, S); rescale ones (O, 1, …) when `rescaled`.
// OptionError when power2factorization finds no layout.
std::pair<torch::Tensor, torch::Tensor> init_weights(const LayerSpec& layer, int64_t rank, bool rescaled,
                                                     const torch::TensorOptions& options = {});

}  // namespace lycoris::functional::boft
