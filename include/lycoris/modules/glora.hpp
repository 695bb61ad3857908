// GLoRA adapter (docs/format.md#glora, docs/training.md#algo-glora): ΔW = s·σ·(W·a1·a2 + b1·b2), s = alpha / r, σ the
// optional trainable scalar (use_scalar; folded into both a2 and b2 on save, docs/format.md#scalar).
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/adapter.hpp"
#include "lycoris/functional/glora.hpp"

namespace lycoris {

class GLoRAImpl : public AdapterImpl {
 public:
  // Fresh adapter at options.rank(); alpha 0 → r. With rs_lora the scale is alpha/√r and the file
  // stores alpha·√r so that the file's alpha/r reproduces it (the reference loses it, docs/loaders.md#q14-glora-rs-lora-alpha).
  GLoRAImpl(const LayerSpec& layer, const AdapterOptions& options);
  // From stored tensors (shapes already checked); `alpha` is the stored tensor (undefined → r).
  GLoRAImpl(const LayerSpec& layer, const functional::glora::Weights& w, const torch::Tensor& alpha);

  torch::Tensor apply_weight(const torch::Tensor& W, double m) override;
  torch::Tensor bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                               double m) override;
  NamedTensors file_tensors() const override;  // alpha, a1.weight, a2.weight, b1.weight, b2.weight
  int64_t rank() const override { return a2.size(0); }
  double alpha() const override { return alpha_; }
  double scale() const { return alpha_ / static_cast<double>(rank()); }

  torch::Tensor a1, a2, b1, b2;
  torch::Tensor scalar;  // defined only with use_scalar

 private:
  functional::glora::Weights weights() const;  // σ folded into a2 and b2
  double alpha_;
  torch::Tensor alpha_tensor_;  // as stored (dtype and shape), on the CPU, for file_tensors; not a buffer, so
                                // Module::to(dtype) cannot turn an int64 alpha into a float
};
TORCH_MODULE(GLoRA);

}  // namespace lycoris
