// Full / native fine-tuning adapter (docs/format.md#full, docs/training.md#algo-full): trains ΔW itself.
//   W' = W + m·diff,  b' = b + m·diff_b  (the intended behaviour; the reference's is broken, docs/loaders.md#q24-full-broken)
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/adapter.hpp"

namespace lycoris {

class FullImpl : public AdapterImpl {
 public:
  // Fresh adapter: diff = 0 (W's shape), diff_b = 0 (O,) when the layer has a bias.
  FullImpl(const LayerSpec& layer, const AdapterOptions& options = AdapterOptions().algo("full"));
  // From stored tensors (shapes already checked); diff_b may be undefined.
  FullImpl(const LayerSpec& layer, const torch::Tensor& diff, const torch::Tensor& diff_b);

  torch::Tensor apply_weight(const torch::Tensor& W, double m) override;
  // b + m·diff_b; without a host bias the bias is created (m·diff_b).
  torch::Tensor apply_bias(const torch::Tensor& b, double m) override;
  bool changes_bias() const override { return diff_b.defined(); }
  torch::Tensor bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                               double m) override;
  NamedTensors file_tensors() const override;  // diff, diff_b?

  torch::Tensor diff, diff_b;

 private:
  // Module dropout decided in apply_weight, reused by apply_bias so W and b skip together.
  bool skip_ = false;
};
TORCH_MODULE(Full);

}  // namespace lycoris
