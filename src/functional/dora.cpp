#include "lycoris/functional/dora.hpp"

#include <torch/torch.h>

#include <limits>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"

namespace lycoris::functional::dora {

std::vector<int64_t> scale_shape(torch::IntArrayRef weight_shape, bool wd_on_out) {
  std::vector<int64_t> s(weight_shape.size(), 1);
  if (wd_on_out)
    s[0] = weight_shape[0];
  else
    s[1] = weight_shape[1];
  return s;
}

namespace {
// ‖V‖₂ per output row or per input column, shaped like dora_scale.
torch::Tensor axis_norm(const torch::Tensor& V, bool wd_on_out) {
  auto rows = wd_on_out ? V.reshape({V.size(0), -1}) : V.transpose(0, 1).reshape({V.size(1), -1});
  return rows.norm(2, {1}).reshape(scale_shape(V.sizes(), wd_on_out));
}
}  // namespace

double epsilon(torch::ScalarType compute) {
  return compute == torch::kFloat64 ? std::numeric_limits<double>::epsilon()
                                    : static_cast<double>(std::numeric_limits<float>::epsilon());
}

torch::Tensor norm(const torch::Tensor& V, bool wd_on_out) { return axis_norm(V, wd_on_out) + epsilon(V.scalar_type()); }

torch::Tensor factor(const torch::Tensor& dora_scale, const torch::Tensor& n, double m) {
  auto g = dora_scale / n;
  if (m != 1.0) g = m * (g - 1) + 1;
  return g;
}

// The reference stores the plain norm of W (no ε).
torch::Tensor init_scale(const torch::Tensor& W, bool wd_on_out) { return axis_norm(to_compute(W.detach(), W), wd_on_out); }

bool on_out(const torch::Tensor& dora_scale, torch::IntArrayRef weight_shape, const std::string& module) {
  if (dora_scale.sizes() == torch::IntArrayRef(scale_shape(weight_shape, true))) return true;
  if (dora_scale.sizes() == torch::IntArrayRef(scale_shape(weight_shape, false))) return false;
  throw ShapeError(module + ".dora_scale: expected shape " + shape_str(scale_shape(weight_shape, true)) +
                   " (norm per output row) or " + shape_str(scale_shape(weight_shape, false)) +
                   " (norm per input column), got " + shape_str(dora_scale.sizes()));
}

torch::Tensor apply(const torch::Tensor& W, const torch::Tensor& dW, const torch::Tensor& dora_scale, double m) {
  const bool out = on_out(dora_scale, W.sizes(), "dora");
  auto V = to_compute(W, W) + to_compute(dW, W).to(W.device());
  return (V * factor(to_compute(dora_scale, W).to(W.device()), norm(V, out), m)).to(W.scalar_type());
}

}  // namespace lycoris::functional::dora

namespace lycoris::functional {

torch::Tensor merge_delta(const torch::Tensor& W, const torch::Tensor& dW, double m, const torch::Tensor& dora_scale) {
  if (dora_scale.defined()) return dora::apply(W, dW, dora_scale, m);
  return (to_compute(W, W) + m * to_compute(dW, W).to(W.device())).to(W.scalar_type());
}

}  // namespace lycoris::functional
