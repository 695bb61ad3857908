#include "lycoris/functional/norm.hpp"

#include <torch/torch.h>

#include "lycoris/functional/common.hpp"

namespace lycoris::functional::norm {

torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& w_norm,
                          const torch::Tensor& b_norm, double m) {
  auto xc = to_compute(x, x);
  auto dw = w_norm.to(xc.options()) * m;
  auto db = b_norm.defined() ? b_norm.to(xc.options()) * m : torch::Tensor();
  return layer_forward(xc, layer, dw, db).to(x.scalar_type());
}

std::pair<torch::Tensor, torch::Tensor> init_weights(const LayerSpec& layer, const torch::TensorOptions& options) {
  return {torch::zeros({layer.out_features}, options), torch::zeros({layer.out_features}, options)};
}

}  // namespace lycoris::functional::norm
