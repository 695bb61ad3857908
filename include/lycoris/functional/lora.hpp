// LoRA / LoCon (docs/format.md#lora) as pure tensor math.
//   ΔW = s · reshape(flat(up) · flat(down), W.shape)                      (no Tucker)
//   ΔW[o, c, κ] = s · Σ_{i,j} up[o, i] · mid[i, j, κ] · down[j, c]         (Tucker, convs)
// Any device, any float dtype: math in functional::compute_dtype, result in the inputs' dtype.
#pragma once
#include <torch/types.h>

#include "lycoris/layer.hpp"

namespace lycoris::functional::lora {

// The stored factors. Shapes: Linear down (r, I), up (O, r); conv down (r, I, *K) or, with Tucker,
// (r, I, 1, …) plus mid (r, r, *K); conv up (O, r, 1, …) or 2-D (O, r) (DyLoRA files). mid may be undefined.
struct Weights {
  torch::Tensor down, up, mid;
};

// Tucker is used only for convs with a kernel size ≠ 1 (silently ignored otherwise, docs/training.md#option-checks).
bool uses_tucker(const LayerSpec& layer, bool tucker);
// ΔW (shape layer.weight_shape()) at multiplier 1 with scale s.
torch::Tensor diff_weight(const LayerSpec& layer, const Weights& w, double scale);
// ΔW·x, the layer's extra output, without materialising ΔW: down (host kernel, stride, padding, dilation)
// → [mid] → up, times s. `rank_mask` (optional, r entries) multiplies the rank channels after down/mid.
torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const Weights& w, double scale,
                          const torch::Tensor& rank_mask = {});
// Reference initialisation (docs/training.md#initialisation): down and mid kaiming-uniform (a = √5); up zero, or
// kaiming-uniform with use_scalar (the scalar then starts at 0).
Weights init_weights(const LayerSpec& layer, int64_t rank, bool tucker, bool use_scalar,
                     const torch::TensorOptions& options = {});

}  // namespace lycoris::functional::lora
