// What Diag-OFT and BOFT share (FORMAT.md §5.8 steps 1–4, §5.9 step 1): the Cayley rotations of the
// stored blocks under the joint constraint, and their interpolation by the multiplier.
#pragma once
#include <torch/types.h>

namespace lycoris::functional::oft {

// R = (I + Q)(I − Q)⁻¹ per block (last two axes), Q = B − Bᵀ. Constraint c > 0: with C = c·O and
// q = ‖Q‖_F + 1e-8 over ALL blocks (and stages) together, Q ← Q·C/q when q > C (QUIRKS Q20).
// Computed (inverse included) in fp32, or fp64 when `like` is fp64.
torch::Tensor rotations(const torch::Tensor& blocks, double constraint, int64_t out_features,
                        const torch::Tensor& like);
// M = m·R + (1 − m)·I per block; with dropout p > 0 (training, Diag-OFT only: QUIRKS Q51) inverted
// dropout acts element-wise on m·R first.
torch::Tensor interpolate(const torch::Tensor& R, double m, double dropout = 0);
// rescale (O, 1, …) as a (O,) vector in `like`'s dtype and device; undefined stays undefined.
torch::Tensor rescale_vector(const torch::Tensor& rescale, const torch::Tensor& like);

}  // namespace lycoris::functional::oft
