// What Diag-OFT and BOFT share (docs/format.md#oft-rotations): the Cayley rotations of the
// stored blocks under the joint constraint, and their interpolation by the multiplier.
#pragma once
#include <torch/types.h>

#include <functional>

#include "lycoris/layer.hpp"

namespace lycoris::functional::oft {

// R = (I + Q)(I − Q)⁻¹ per block (last two axes), Q = B − Bᵀ. Constraint c > 0: with C = c·O and
// q = ‖Q‖_F + 1e-8 over ALL blocks (and stages) together, Q ← Q·C/q when q > C (docs/loaders.md#q20-oft-constraint).
// Computed (inverse included) in fp32, or fp64 when `like` is fp64. Non-finite blocks (or a Q that
// overflows) give NaN/Inf, never an error.
torch::Tensor rotations(const torch::Tensor& blocks, double constraint, int64_t out_features,
                        const torch::Tensor& like);
// M = m·R + (1 − m)·I per block; with dropout p > 0 (training, Diag-OFT only: docs/loaders.md#q51-diag-oft-dropout) inverted
// dropout acts element-wise on m·R first.
torch::Tensor interpolate(const torch::Tensor& R, double m, double dropout = 0);
// rescale (O, 1, …) as a (O,) vector in `like`'s dtype and device; undefined stays undefined.
torch::Tensor rescale_vector(const torch::Tensor& rescale, const torch::Tensor& like);

// How Diag-OFT / BOFT transform the output rows X (O, …) with their matrices (computed from `like`).
using RowMap = std::function<torch::Tensor(const torch::Tensor& X, const torch::Tensor& like)>;
// W' = rescale ⊙ rotate(W) row-wise (rescale undefined → 1, never interpolated: docs/loaders.md#q19-rescale-ignores-multiplier), in W's compute
// dtype, returned in W's dtype.
torch::Tensor apply_rows(const torch::Tensor& W, const torch::Tensor& rescale, const RowMap& rotate);
// The bypass output: op(x, W) without bias, rotated on its channel axis, rescaled, then the bias added
// unrotated — equal to op(x, W') + b.
torch::Tensor bypass_rows(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                          const torch::Tensor& b, const torch::Tensor& rescale, const RowMap& rotate);

}  // namespace lycoris::functional::oft
