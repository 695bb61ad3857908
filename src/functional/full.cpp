#include "lycoris/functional/full.hpp"

#include <torch/torch.h>

#include "lycoris/functional/common.hpp"

namespace lycoris::functional::full {

torch::Tensor diff_weight(const torch::Tensor& diff, double m) {
  return (to_compute(diff, diff) * m).to(diff.scalar_type());
}

torch::Tensor apply_weight(const torch::Tensor& W, const torch::Tensor& diff, double m) {
  auto w = to_compute(W, W);
  return torch::add(w, diff.to(w.options()), m).to(W.scalar_type());
}

torch::Tensor apply_bias(const torch::Tensor& b, const torch::Tensor& diff_b, double m) {
  if (!diff_b.defined()) return b;
  if (!b.defined()) return diff_b * m;
  auto bc = to_compute(b, b);
  return (bc + m * diff_b.to(bc.options())).to(b.scalar_type());
}

torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& diff, double m) {
  auto xc = to_compute(x, x);
  return host_op(xc, layer, diff.to(xc.options()) * m).to(x.scalar_type());
}

std::pair<torch::Tensor, torch::Tensor> init_weights(const LayerSpec& layer, const torch::TensorOptions& options) {
  auto diff = torch::zeros(layer.weight_shape(), options);
  auto diff_b = layer.has_bias ? torch::zeros({layer.out_features}, options) : torch::Tensor();
  return {diff, diff_b};
}

}  // namespace lycoris::functional::full
