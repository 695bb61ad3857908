#include "lycoris/functional/ia3.hpp"

#include <torch/torch.h>

#include "lycoris/functional/channels.hpp"
#include "lycoris/functional/common.hpp"

namespace lycoris::functional::ia3 {

namespace {
// v as a broadcastable factor for W (O, I, *K): (C, 1, …) for output rows, (1, C, 1, …) for input columns.
torch::Tensor weight_view(const torch::Tensor& v, int64_t ndim, bool on_input) {
  std::vector<int64_t> shape(static_cast<size_t>(ndim), 1);
  shape[on_input ? 1 : 0] = v.numel();
  return v.reshape(shape);
}
}  // namespace

std::vector<int64_t> vector_shape(const LayerSpec& layer, bool on_input) {
  const int64_t c = on_input ? layer.in_features : layer.out_features;
  if (!layer.is_conv()) return {c};
  std::vector<int64_t> shape(layer.kernel.size() + 2, 1);
  shape[1] = c;
  return shape;
}

torch::Tensor diff_weight(const torch::Tensor& W, const torch::Tensor& v, bool on_input, double m) {
  auto w = to_compute(W, W);
  return (w * (weight_view(v.to(w.options()), w.dim(), on_input) * m)).to(W.scalar_type());
}

torch::Tensor apply_weight(const torch::Tensor& W, const torch::Tensor& v, bool on_input, double m) {
  auto w = to_compute(W, W);
  return (w * (weight_view(v.to(w.options()), w.dim(), on_input) * m + 1)).to(W.scalar_type());
}

torch::Tensor bypass_forward(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                             const torch::Tensor& b, const torch::Tensor& v, bool on_input, double m) {
  auto xc = to_compute(x, x);
  auto factor = v.to(xc.options()).reshape({-1}) * m + 1;
  auto w = W.to(xc.options());
  torch::Tensor y = on_input ? host_op(scale_channels(xc, layer, factor), layer, w)
                             : scale_channels(host_op(xc, layer, w), layer, factor);
  if (b.defined()) y = add_channels(y, layer, b.to(xc.options()));
  return y.to(x.scalar_type());
}

torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                          const torch::Tensor& v, bool on_input, double m) {
  auto xc = to_compute(x, x);
  auto mv = v.to(xc.options()).reshape({-1}) * m;
  auto w = W.to(xc.options());
  auto y = on_input ? host_op(scale_channels(xc, layer, mv), layer, w) : scale_channels(host_op(xc, layer, w), layer, mv);
  return y.to(x.scalar_type());
}

torch::Tensor init_weights(const LayerSpec& layer, bool on_input, const torch::TensorOptions& options) {
  return torch::zeros(vector_shape(layer, on_input), options);
}

}  // namespace lycoris::functional::ia3
