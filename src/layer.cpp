#include "lycoris/layer.hpp"

#include <torch/torch.h>

#include "lycoris/error.hpp"

namespace lycoris {

const char* to_string(LayerKind kind) {
  switch (kind) {
    case LayerKind::Linear: return "Linear";
    case LayerKind::Conv1d: return "Conv1d";
    case LayerKind::Conv2d: return "Conv2d";
    case LayerKind::Conv3d: return "Conv3d";
    case LayerKind::LayerNorm: return "LayerNorm";
    case LayerKind::GroupNorm: return "GroupNorm";
  }
  return "?";
}

bool LayerSpec::is_conv() const {
  return kind == LayerKind::Conv1d || kind == LayerKind::Conv2d || kind == LayerKind::Conv3d;
}
bool LayerSpec::is_norm() const { return kind == LayerKind::LayerNorm || kind == LayerKind::GroupNorm; }

int64_t LayerSpec::kernel_numel() const {
  int64_t k = 1;
  for (auto v : kernel) k *= v;
  return k;
}

std::vector<int64_t> LayerSpec::weight_shape() const {
  if (is_norm()) return {out_features};
  std::vector<int64_t> s{out_features, is_conv() ? in_features / groups : in_features};
  s.insert(s.end(), kernel.begin(), kernel.end());
  return s;
}

std::string LayerSpec::describe() const {
  std::string s = std::string(to_string(kind)) + "(";
  if (is_norm()) return s + std::to_string(out_features) + ")";
  s += std::to_string(in_features) + ", " + std::to_string(out_features);
  if (!kernel.empty()) {
    s += ", k=";
    for (size_t i = 0; i < kernel.size(); ++i) s += (i ? "x" : "") + std::to_string(kernel[i]);
  }
  return s + ")";
}

LayerSpec LayerSpec::linear(int64_t in, int64_t out, bool bias) {
  LayerSpec s;
  s.kind = LayerKind::Linear;
  s.in_features = in;
  s.out_features = out;
  s.has_bias = bias;
  return s;
}

LayerSpec LayerSpec::conv(int64_t in, int64_t out, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                          std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, bool bias) {
  const size_t n = kernel.size();
  if (n < 1 || n > 3) throw OptionError("LayerSpec::conv: kernel must have 1 to 3 sizes");
  LayerSpec s;
  s.kind = n == 1 ? LayerKind::Conv1d : n == 2 ? LayerKind::Conv2d : LayerKind::Conv3d;
  s.in_features = in;
  s.out_features = out;
  s.kernel = std::move(kernel);
  s.stride = stride.empty() ? std::vector<int64_t>(n, 1) : std::move(stride);
  s.padding = padding.empty() ? std::vector<int64_t>(n, 0) : std::move(padding);
  s.dilation = dilation.empty() ? std::vector<int64_t>(n, 1) : std::move(dilation);
  if (s.stride.size() != n || s.padding.size() != n || s.dilation.size() != n)
    throw OptionError("LayerSpec::conv: stride/padding/dilation must have as many sizes as the kernel");
  s.groups = groups;
  s.has_bias = bias;
  return s;
}

LayerSpec LayerSpec::layer_norm(int64_t size, double eps, bool bias) {
  LayerSpec s;
  s.kind = LayerKind::LayerNorm;
  s.out_features = size;
  s.eps = eps;
  s.has_bias = bias;
  return s;
}

LayerSpec LayerSpec::group_norm(int64_t groups, int64_t channels, double eps, bool bias) {
  LayerSpec s;
  s.kind = LayerKind::GroupNorm;
  s.out_features = channels;
  s.groups = groups;
  s.eps = eps;
  s.has_bias = bias;
  return s;
}

LayerSpec LayerSpec::from_weight_shape(const std::vector<int64_t>& shape, bool bias) {
  if (shape.size() == 1) return layer_norm(shape[0], 1e-5, bias);
  if (shape.size() == 2) return linear(shape[1], shape[0], bias);
  if (shape.size() >= 3 && shape.size() <= 5)
    return conv(shape[1], shape[0], std::vector<int64_t>(shape.begin() + 2, shape.end()), {}, {}, {}, 1, bias);
  throw ShapeError("cannot infer a layer from a weight of " + std::to_string(shape.size()) + " dimensions");
}

torch::Tensor layer_forward(const torch::Tensor& x, const LayerSpec& spec, const torch::Tensor& weight,
                            const torch::Tensor& bias) {
  switch (spec.kind) {
    // spelled out: in the unity build other files' `F` (lycoris::functional) shares this namespace
    case LayerKind::Linear: return torch::nn::functional::linear(x, weight, bias);
    case LayerKind::Conv1d:
      return torch::conv1d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups);
    case LayerKind::Conv2d:
      return torch::conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups);
    case LayerKind::Conv3d:
      return torch::conv3d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups);
    case LayerKind::LayerNorm:
      return torch::layer_norm(x, {spec.out_features}, weight, bias, spec.eps);
    case LayerKind::GroupNorm: return torch::group_norm(x, spec.groups, weight, bias, spec.eps);
  }
  throw OptionError("layer_forward: unknown layer kind");
}

}  // namespace lycoris
