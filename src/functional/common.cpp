#include "lycoris/functional/common.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <sstream>

#include "lycoris/error.hpp"

namespace lycoris::functional {

double scalar_value(const torch::Tensor& t, const std::string& module, const std::string& key) {
  if (!t.defined() || t.numel() != 1 || t.dim() > 1)
    throw ShapeError(module + "." + key + ": expected a single value of shape [] or [1], got " +
                     (t.defined() ? shape_str(t.sizes()) : std::string("nothing")));
  if (t.scalar_type() == torch::kBool)
    throw ShapeError(module + "." + key + ": expected a number, got a bool tensor");
  return t.to(torch::kCPU).to(torch::kFloat64).item<double>();
}

const torch::Tensor& require(const TensorMap& tensors, const std::string& key, const std::string& module) {
  auto it = tensors.find(key);
  if (it == tensors.end()) {
    std::string has;
    for (const auto& kv : tensors) has += (has.empty() ? "" : ", ") + kv.first;
    throw KeyError(module + ": missing key '" + key + "' (has: " + has + ")");
  }
  return it->second;
}

torch::Tensor optional(const TensorMap& tensors, const std::string& key) {
  auto it = tensors.find(key);
  return it == tensors.end() ? torch::Tensor() : it->second;
}

void expect_shape(const torch::Tensor& t, torch::IntArrayRef expected, const std::string& module,
                  const std::string& key, const std::string& why) {
  if (t.sizes() != expected)
    throw ShapeError(module + "." + key + ": expected shape " + shape_str(expected) + ", got " +
                     shape_str(t.sizes()) + (why.empty() ? "" : " (" + why + ")"));
}

torch::Tensor flat(const torch::Tensor& t) { return t.reshape({t.size(0), -1}); }

torch::ScalarType compute_dtype(const torch::Tensor& like) {
  return like.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
}

torch::Tensor to_compute(const torch::Tensor& t, const torch::Tensor& like) {
  return t.to(compute_dtype(like));
}

std::string shape_str(torch::IntArrayRef shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

}  // namespace lycoris::functional

namespace lycoris::functional {

torch::Tensor with_unit_kernel(const torch::Tensor& w2d, int64_t ndim) {
  std::vector<int64_t> shape{w2d.size(0), w2d.size(1)};
  shape.resize(static_cast<size_t>(std::max<int64_t>(ndim, 2)), 1);
  return w2d.reshape(shape);
}

torch::Tensor host_op(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& w) {
  switch (layer.kind) {
    case LayerKind::Linear: return torch::matmul(x, w.t());
    case LayerKind::Conv1d: return torch::conv1d(x, w, {}, layer.stride, layer.padding, layer.dilation);
    case LayerKind::Conv2d: return torch::conv2d(x, w, {}, layer.stride, layer.padding, layer.dilation);
    case LayerKind::Conv3d: return torch::conv3d(x, w, {}, layer.stride, layer.padding, layer.dilation);
    default: throw OptionError("host_op: " + layer.describe() + " is not a Linear or Conv layer");
  }
}

torch::Tensor pointwise_op(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& w2d) {
  switch (layer.kind) {
    case LayerKind::Linear: return torch::matmul(x, w2d.t());
    case LayerKind::Conv1d: return torch::conv1d(x, with_unit_kernel(w2d, 3));
    case LayerKind::Conv2d: return torch::conv2d(x, with_unit_kernel(w2d, 4));
    case LayerKind::Conv3d: return torch::conv3d(x, with_unit_kernel(w2d, 5));
    default: throw OptionError("pointwise_op: " + layer.describe() + " is not a Linear or Conv layer");
  }
}

bool module_dropped(double module_dropout, bool training) {
  return training && module_dropout > 0 && torch::rand({1}).item<double>() < module_dropout;
}

torch::Tensor keep_mask(int64_t n, double p, bool rescale, const torch::TensorOptions& options) {
  auto mask = (torch::rand({n}, options) > p).to(options.dtype());
  if (rescale) {
    auto mean = mask.mean();
    mask = torch::where(mean > 0, mask / mean.clamp_min(1e-12), mask);
  }
  return mask;
}

torch::Tensor drop_rows(const torch::Tensor& dw, double p, bool rescale) {
  std::vector<int64_t> shape(static_cast<size_t>(dw.dim()), 1);
  shape[0] = dw.size(0);
  return dw * keep_mask(dw.size(0), p, rescale, dw.options()).view(shape);
}

}  // namespace lycoris::functional

namespace lycoris::functional {

void expect_keys(const TensorMap& tensors, const std::vector<std::string>& allowed, const std::string& module,
                 const std::string& algo) {
  std::string unknown;
  for (const auto& kv : tensors)
    if (std::find(allowed.begin(), allowed.end(), kv.first) == allowed.end())
      unknown += (unknown.empty() ? "'" : ", '") + kv.first + "'";
  if (unknown.empty()) return;
  std::string list;
  for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
  throw KeyError(module + ": unknown key(s) " + unknown + " for " + algo + " (allowed: " + list + ")");
}

std::string unsupported_layer(const LayerSpec& layer) {
  if (layer.kind != LayerKind::Linear && !layer.is_conv())
    return layer.describe() + " is not a Linear or Conv1d/2d/3d layer";
  if (layer.is_conv() && layer.groups != 1)
    return layer.describe() + " has groups = " + std::to_string(layer.groups) + " (grouped convolutions are not supported)";
  return {};
}

torch::Tensor owned_float(const torch::Tensor& t) {
  const auto dtype = t.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  return t.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

}  // namespace lycoris::functional

