#include "lycoris/functional/glora.hpp"

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <utility>

#include "lycoris/functional/channels.hpp"
#include "lycoris/functional/common.hpp"

namespace lycoris::functional::glora {

namespace {
// (a, b) followed by a unit kernel for convs: (a, b, 1, …, 1).
std::vector<int64_t> pointwise_shape(const LayerSpec& layer, int64_t a, int64_t b) {
  std::vector<int64_t> s{a, b};
  if (layer.is_conv()) s.resize(layer.kernel.size() + 2, 1);
  return s;
}
torch::Tensor rank_drop(const torch::Tensor& h, const LayerSpec& layer, const BypassDropout& d) {
  if (d.rank_dropout <= 0) return h;
  const int64_t r = h.size(channel_axis(layer, h.dim()));
  return scale_channels(h, layer, keep_mask(r, d.rank_dropout, d.rank_dropout_scale, h.options()));
}
torch::Tensor drop(const torch::Tensor& h, const BypassDropout& d) {
  return d.dropout > 0 ? torch::dropout(h, d.dropout, /*train=*/true) : h;
}
}  // namespace

std::vector<int64_t> a1_shape(const LayerSpec& layer, int64_t r) { return pointwise_shape(layer, layer.in_features, r); }
std::vector<int64_t> a2_shape(const LayerSpec& layer, int64_t r) { return pointwise_shape(layer, r, layer.in_features); }
std::vector<int64_t> b1_shape(const LayerSpec& layer, int64_t r) { return pointwise_shape(layer, layer.out_features, r); }
std::vector<int64_t> b2_shape(const LayerSpec& layer, int64_t r) {
  std::vector<int64_t> s{r, layer.in_features};
  s.insert(s.end(), layer.kernel.begin(), layer.kernel.end());
  return s;
}

namespace {
// (W·A, B) in the compute dtype of W. W·A = (W·a1)·a2 contracting W's input axis (1), kernel axes kept
// in place: O·I·r·k operations instead of O·I²·k for W·(a1·a2).
std::pair<torch::Tensor, torch::Tensor> terms(const torch::Tensor& wc, const Weights& w) {
  const auto o = wc.options();
  auto B = torch::matmul(flat(w.b1).to(o), flat(w.b2).to(o)).view(wc.sizes());
  auto Wa1 = torch::tensordot(wc, flat(w.a1).to(o), {1}, {0});    // (O, *K, r)
  auto WA = torch::matmul(Wa1, flat(w.a2).to(o)).movedim(-1, 1);  // (O, I, *K)
  return {WA, B};
}
}  // namespace

torch::Tensor diff_weight(const torch::Tensor& W, const Weights& w, double s) {
  auto wc = to_compute(W, W);
  auto [WA, B] = terms(wc, w);
  return torch::add(WA, B).mul_(s).to(W.scalar_type());
}

torch::Tensor apply_weight(const torch::Tensor& W, const Weights& w, double s, double m) {
  auto wc = to_compute(W, W);
  auto [WA, B] = terms(wc, w);
  // W + m·s·(W·A + B). torch refuses an add's alpha beyond the float32 range: such an m·s is applied as a
  // factor, which overflows to Inf (the merge reports it); the two fused adds otherwise (one pass less)
  const double c = m * s;
  if (wc.scalar_type() != torch::kFloat64 && std::isfinite(c) && std::abs(c) > std::numeric_limits<float>::max())
    return WA.add_(B).mul_(c).add_(wc).to(W.scalar_type());
  return torch::add(wc, WA, c).add_(B, c).to(W.scalar_type());
}

torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W, const Weights& w,
                          double s, double m, const BypassDropout& d) {
  auto xc = to_compute(x, x);
  const auto o = xc.options();
  auto a = rank_drop(pointwise_op(xc, layer, flat(w.a2).to(o)), layer, d);
  auto ax = drop(pointwise_op(a, layer, flat(w.a1).to(o)), d);
  auto c = rank_drop(host_op(xc, layer, w.b2.to(o)), layer, d);
  auto bx = drop(pointwise_op(c, layer, flat(w.b1).to(o)), d);
  return ((host_op(ax, layer, W.to(o)) + bx) * (m * s)).to(x.scalar_type());
}

Weights init_weights(const LayerSpec& layer, int64_t r, bool use_scalar, const torch::TensorOptions& options) {
  auto ku = [&](std::vector<int64_t> shape) {
    auto t = torch::empty(shape, options);
    torch::nn::init::kaiming_uniform_(t, std::sqrt(5.0));
    return t;
  };
  auto zero_or_ku = [&](std::vector<int64_t> shape) { return use_scalar ? ku(shape) : torch::zeros(shape, options); };
  return {ku(a1_shape(layer, r)), zero_or_ku(a2_shape(layer, r)), ku(b1_shape(layer, r)),
          zero_or_ku(b2_shape(layer, r))};
}

}  // namespace lycoris::functional::glora
