// DoRA weight decomposition (docs/format.md#dora), shared by LoRA, LoHa and LoKr.
//   V = W + ΔW (ΔW at multiplier 1), g = dora_scale / (‖V‖ + ε), g ← m·(g − 1) + 1 when m ≠ 1, W' = V ⊙ g
// with ‖·‖ per output row (dora_scale (O, 1, …, 1)) or per input column (dora_scale (1, I, 1, …, 1)),
// ε the machine epsilon of the working dtype (fp32, or fp64 for fp64 weights).
#pragma once
#include <torch/types.h>

#include <string>
#include <vector>

namespace lycoris::functional::dora {

// Shape of dora_scale for a weight of `weight_shape`: (O, 1, …) when wd_on_out, else (1, I, 1, …).
std::vector<int64_t> scale_shape(torch::IntArrayRef weight_shape, bool wd_on_out);
// Initial dora_scale: the norms of W (fp32, or fp64 for an fp64 W), shaped as scale_shape.
torch::Tensor init_scale(const torch::Tensor& W, bool wd_on_out);
// Which axis a stored dora_scale normalises: true = per output row. ShapeError naming `module` when it
// fits neither layout.
bool on_out(const torch::Tensor& dora_scale, torch::IntArrayRef weight_shape, const std::string& module);
// ε of the working dtype: fp64's machine epsilon for fp64, else fp32's.
double epsilon(torch::ScalarType compute);
// ‖V‖ + ε along the layout of dora_scale, broadcastable to V.
torch::Tensor norm(const torch::Tensor& V, bool wd_on_out);
// The factor of W' = V ⊙ g': g = dora_scale / n (n = ‖V‖ + ε), g' = m·(g − 1) + 1 when m ≠ 1, else g.
// (Lets callers that compute the norms in pieces, e.g. the chunked merge, share the rule.)
torch::Tensor factor(const torch::Tensor& dora_scale, const torch::Tensor& n, double m);
// W' = (W + ΔW) ⊙ (m·(g − 1) + 1), computed in the compute dtype of W, returned in W's dtype.
// The axis comes from dora_scale's shape.
torch::Tensor apply(const torch::Tensor& W, const torch::Tensor& dW, const torch::Tensor& dora_scale, double m);

}  // namespace lycoris::functional::dora

namespace lycoris::functional {

// The merged weight of an additive algorithm at multiplier m: W + m·ΔW, or the DoRA rule when
// dora_scale is defined. Math in W's compute dtype on W's device; result in W's dtype.
torch::Tensor merge_delta(const torch::Tensor& W, const torch::Tensor& dW, double m,
                          const torch::Tensor& dora_scale = {});

}  // namespace lycoris::functional
