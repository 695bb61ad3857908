// (IA)^3 adapter (docs/format.md#ia3, docs/training.md#algo-ia3): a learned vector v scales W's output rows, or its
// input columns with train_on_input:  W' = W ⊙ (1 + m·v). The bias is never scaled (docs/loaders.md#q11-ia3-bypass-scales-bias).
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/adapter.hpp"

namespace lycoris {

class IA3Impl : public AdapterImpl {
 public:
  // Fresh adapter: v = 0, on the input axis when options.train_on_input().
  IA3Impl(const LayerSpec& layer, const AdapterOptions& options = AdapterOptions().algo("ia3"));
  // From stored tensors (shape already checked against on_input).
  IA3Impl(const LayerSpec& layer, const torch::Tensor& weight, bool on_input);

  bool on_input() const { return on_input_; }
  torch::Tensor apply_weight(const torch::Tensor& W, double m) override;
  torch::Tensor bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                               double m) override;
  NamedTensors file_tensors() const override;  // weight, on_input (int64, 0-dim)
  // W[r0:r1] ⊙= 1 + m·v along the output rows or the input columns (eval mode, 2-D or wider weights).
  std::unique_ptr<RowKernel> row_kernel(double m, const torch::TensorOptions& compute,
                                        torch::IntArrayRef shape) const override;

  torch::Tensor weight;

 private:
  bool on_input_;
};
TORCH_MODULE(IA3);

}  // namespace lycoris
