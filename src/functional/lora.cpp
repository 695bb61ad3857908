#include "lycoris/functional/lora.hpp"

#include <torch/torch.h>

#include <cmath>

#include "lycoris/functional/common.hpp"

namespace lycoris::functional::lora {

bool uses_tucker(const LayerSpec& layer, bool tucker) {
  if (!tucker || !layer.is_conv()) return false;
  for (auto k : layer.kernel)
    if (k != 1) return true;
  return false;
}

torch::Tensor diff_weight(const LayerSpec& layer, const Weights& w, double scale) {
  const auto& like = w.up;
  auto up = flat(to_compute(w.up, like));
  auto down = to_compute(w.down, like);
  torch::Tensor dw;
  if (w.mid.defined()) {
    // (i, j, *K) → (i, *K, j) · down (j, I) → (i, *K, I) → (i, I, *K) → flat (i, I·k); then up · that.
    auto t = torch::matmul(to_compute(w.mid, like).movedim(1, -1), flat(down)).movedim(-1, 1);
    dw = torch::matmul(up, flat(t));
  } else {
    dw = torch::matmul(up, flat(down));
  }
  // in place: dw is a fresh product, and `dw * scale` would be one more ΔW-sized allocation and pass
  // (same values bit for bit)
  return dw.mul_(scale).reshape(layer.weight_shape()).to(like.scalar_type());
}

torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const Weights& w, double scale,
                          const torch::Tensor& rank_mask) {
  auto xc = to_compute(x, x);
  torch::Tensor h;
  if (w.mid.defined()) {
    h = pointwise_op(xc, layer, flat(to_compute(w.down, x)));
    h = host_op(h, layer, to_compute(w.mid, x));
  } else {
    h = host_op(xc, layer, to_compute(w.down, x));
  }
  if (rank_mask.defined()) {
    // rank channels: last axis for Linear, channel axis for convs (fixes the reference's axis, docs/loaders.md#q26-rank-dropout-axis)
    std::vector<int64_t> shape(static_cast<size_t>(h.dim()), 1);
    const int64_t axis = layer.is_conv() ? h.dim() - 1 - static_cast<int64_t>(layer.kernel.size()) : h.dim() - 1;
    shape[static_cast<size_t>(axis)] = rank_mask.numel();
    h = h * rank_mask.to(h.options()).view(shape);
  }
  return (pointwise_op(h, layer, flat(to_compute(w.up, x))) * scale).to(x.scalar_type());
}

Weights init_weights(const LayerSpec& layer, int64_t rank, bool tucker, bool use_scalar,
                     const torch::TensorOptions& options) {
  const int64_t O = layer.out_features, I = layer.in_features;
  const auto unit = [&](std::vector<int64_t> s) {
    s.resize(layer.kernel.size() + 2, 1);
    return s;
  };
  Weights w;
  if (uses_tucker(layer, tucker)) {
    w.down = torch::empty(unit({rank, I}), options);
    std::vector<int64_t> mid{rank, rank};
    mid.insert(mid.end(), layer.kernel.begin(), layer.kernel.end());
    w.mid = torch::empty(mid, options);
  } else {
    std::vector<int64_t> down{rank, I};
    down.insert(down.end(), layer.kernel.begin(), layer.kernel.end());
    w.down = torch::empty(down, options);
  }
  w.up = torch::empty(unit({O, rank}), options);
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(w.down, std::sqrt(5.0));
  if (use_scalar)
    torch::nn::init::kaiming_uniform_(w.up, std::sqrt(5.0));
  else
    w.up.zero_();
  if (w.mid.defined()) torch::nn::init::kaiming_uniform_(w.mid, std::sqrt(5.0));
  return w;
}

}  // namespace lycoris::functional::lora
