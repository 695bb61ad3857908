// Norm-layer adapter (docs/format.md#norm, docs/training.md#algo-norm) for LayerNorm / GroupNorm:
//   w' = w + m·w_norm,  b' = b + m·b_norm
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/adapter.hpp"

namespace lycoris {

class NormImpl : public AdapterImpl {
 public:
  // Fresh adapter: w_norm = b_norm = 0 (C,).
  NormImpl(const LayerSpec& layer, const AdapterOptions& options = AdapterOptions().algo("norm"));
  // From stored tensors (shapes already checked); b_norm may be undefined.
  NormImpl(const LayerSpec& layer, const torch::Tensor& w_norm, const torch::Tensor& b_norm);

  // Training: rank_dropout drops channels of w_norm and b_norm together (keep iff u > p, the convention
  // of every other algorithm; the reference's inverted mask is docs/loaders.md#q25-norm-defects).
  torch::Tensor apply_weight(const torch::Tensor& w, double m) override;
  // b + m·b_norm; without a host bias the bias is created (m·b_norm).
  torch::Tensor apply_bias(const torch::Tensor& b, double m) override;
  bool changes_bias() const override { return b_norm.defined(); }
  // norm(x, w, b) + norm(x, m·w_norm, m·b_norm)
  torch::Tensor bypass_forward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                               double m) override;
  NamedTensors file_tensors() const override;  // w_norm, b_norm?

  torch::Tensor w_norm, b_norm;

 private:
  // (w_norm, b_norm) after the training-time channel dropout.
  std::pair<torch::Tensor, torch::Tensor> effective();
  // Module dropout and channel mask decided in apply_weight, reused by apply_bias.
  bool skip_ = false;
  torch::Tensor mask_;
};
TORCH_MODULE(Norm);

}  // namespace lycoris
