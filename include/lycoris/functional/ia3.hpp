// (IA)^3 (docs/format.md#ia3): a learned vector v scales the output rows (on_input = 0) or the input
// columns (on_input = 1) of W:  W' = W ⊙ (1 + m·v)  along that axis. The bias is never scaled (canonical
// rebuild semantics, also in bypass: docs/loaders.md#q11-ia3-bypass-scales-bias).
#pragma once
#include <torch/types.h>

#include <vector>

#include "lycoris/layer.hpp"

namespace lycoris::functional::ia3 {

// Stored shape of v: (C,) for Linear, (1, C, 1, …, 1) for convs; C = O, or I when on_input.
std::vector<int64_t> vector_shape(const LayerSpec& layer, bool on_input);
// W ⊙ (1 + m·v) along the chosen axis, in the compute dtype of W, returned in W's dtype.
torch::Tensor apply_weight(const torch::Tensor& W, const torch::Tensor& v, bool on_input, double m);
// ΔW = m · W ⊙ v along the chosen axis.
torch::Tensor diff_weight(const torch::Tensor& W, const torch::Tensor& v, bool on_input, double m);
// The adapted layer's output without building W': on_input: op(x ⊙ (1 + m·v), W) + b;
// otherwise op(x, W) ⊙ (1 + m·v) + b (bias added after the scaling, so it stays unscaled).
torch::Tensor bypass_forward(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                             const torch::Tensor& b, const torch::Tensor& v, bool on_input, double m);
// ΔW·x without building ΔW: op(x ⊙ m·v, W) or op(x, W) ⊙ m·v.
torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                          const torch::Tensor& v, bool on_input, double m);
// Initial v: zeros of vector_shape.
torch::Tensor init_weights(const LayerSpec& layer, bool on_input, const torch::TensorOptions& options = {});

}  // namespace lycoris::functional::ia3
