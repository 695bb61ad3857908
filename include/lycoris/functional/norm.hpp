// Norm layers (docs/format.md#norm): w' = w + m·w_norm, b' = b + m·b_norm — the same additive rule as Full
// (functional::full::apply_weight / apply_bias); here only what is specific to norms.
#pragma once
#include <torch/types.h>

#include <utility>

#include "lycoris/layer.hpp"

namespace lycoris::functional::norm {

// The layer's extra output: the host's normalisation of x with weight m·w_norm and bias m·b_norm
// (b_norm may be undefined). Exact, since a norm layer's output is affine in (weight, bias).
torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& w_norm,
                          const torch::Tensor& b_norm, double m);
// Initial (w_norm, b_norm): zeros (C,). b_norm is always created, as the reference does for any norm
// with a bias attribute (docs/training.md#initialisation, docs/loaders.md#q25-norm-defects).
std::pair<torch::Tensor, torch::Tensor> init_weights(const LayerSpec& layer,
                                                     const torch::TensorOptions& options = {});

}  // namespace lycoris::functional::norm
