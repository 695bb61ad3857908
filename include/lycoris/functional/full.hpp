// Full / native fine-tuning (docs/format.md#full): the file stores ΔW itself.
//   W' = W + m·diff,  b' = b + m·diff_b
#pragma once
#include <torch/types.h>

#include <utility>

#include "lycoris/layer.hpp"

namespace lycoris::functional::full {

// m·diff in the compute dtype of `diff`, returned in diff's dtype.
torch::Tensor diff_weight(const torch::Tensor& diff, double m);
// W + m·diff computed in the compute dtype of W, returned in W's dtype and device.
torch::Tensor apply_weight(const torch::Tensor& W, const torch::Tensor& diff, double m);
// b + m·diff_b; an undefined b gives m·diff_b (the bias is created), an undefined diff_b gives b.
torch::Tensor apply_bias(const torch::Tensor& b, const torch::Tensor& diff_b, double m);
// The layer's extra output op(x, m·diff) (no bias), computed in the compute dtype of x, returned in x's.
torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& diff, double m);
// Initial (diff, diff_b): zeros of W's shape and (O,) (diff_b undefined when the layer has no bias).
std::pair<torch::Tensor, torch::Tensor> init_weights(const LayerSpec& layer,
                                                     const torch::TensorOptions& options = {});

}  // namespace lycoris::functional::full
