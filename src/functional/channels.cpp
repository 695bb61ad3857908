#include "lycoris/functional/channels.hpp"

#include <torch/torch.h>

#include <vector>

namespace lycoris::functional {

int64_t channel_axis(const LayerSpec& layer, int64_t ndim) {
  if (!layer.is_conv()) return ndim - 1;
  // conv activations are (N, C, *spatial) or unbatched (C, *spatial)
  return ndim - static_cast<int64_t>(layer.kernel.size()) - 1;
}

torch::Tensor scale_channels(const torch::Tensor& y, const LayerSpec& layer, const torch::Tensor& v) {
  const int64_t axis = channel_axis(layer, y.dim());
  std::vector<int64_t> shape(static_cast<size_t>(y.dim()), 1);
  shape[static_cast<size_t>(axis)] = v.numel();
  return y * v.reshape(shape);
}

torch::Tensor add_channels(const torch::Tensor& y, const LayerSpec& layer, const torch::Tensor& b) {
  const int64_t axis = channel_axis(layer, y.dim());
  std::vector<int64_t> shape(static_cast<size_t>(y.dim()), 1);
  shape[static_cast<size_t>(axis)] = b.numel();
  return y + b.reshape(shape);
}

torch::Tensor map_channel_rows(const torch::Tensor& y, const LayerSpec& layer,
                               const std::function<torch::Tensor(const torch::Tensor&)>& f) {
  const int64_t axis = channel_axis(layer, y.dim());
  auto moved = y.movedim(axis, 0);
  auto sizes = moved.sizes().vec();
  auto rows = f(moved.reshape({sizes[0], -1}));
  return rows.reshape(sizes).movedim(0, axis);
}

}  // namespace lycoris::functional
