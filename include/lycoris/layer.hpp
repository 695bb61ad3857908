// LayerSpec: everything an adapter needs to know about the layer it wraps.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace at {
class Tensor;
}

namespace lycoris {

enum class LayerKind { Linear, Conv1d, Conv2d, Conv3d, LayerNorm, GroupNorm };

const char* to_string(LayerKind kind);

struct LayerSpec {
  LayerKind kind = LayerKind::Linear;
  int64_t out_features = 0;  // O: out_features / out_channels / normalized size / num_channels
  int64_t in_features = 0;   // I: in_features / in_channels (0 for norms)
  std::vector<int64_t> kernel;  // empty for Linear and norms
  std::vector<int64_t> stride, padding, dilation;  // conv only; same length as kernel
  int64_t groups = 1;        // conv groups, or GroupNorm num_groups
  double eps = 1e-5;         // norms
  bool has_bias = true;

  bool is_conv() const;
  bool is_norm() const;
  int64_t kernel_numel() const;             // k: product of the kernel sizes (1 for Linear)
  std::vector<int64_t> weight_shape() const;  // (O, I, *K) or (C,) for norms
  std::string describe() const;             // "Conv2d(320, 640, k=3x3)"

  static LayerSpec linear(int64_t in, int64_t out, bool bias = true);
  static LayerSpec conv(int64_t in, int64_t out, std::vector<int64_t> kernel, std::vector<int64_t> stride = {},
                        std::vector<int64_t> padding = {}, std::vector<int64_t> dilation = {}, int64_t groups = 1,
                        bool bias = true);
  static LayerSpec layer_norm(int64_t size, double eps = 1e-5, bool bias = true);
  static LayerSpec group_norm(int64_t groups, int64_t channels, double eps = 1e-5, bool bias = true);
  // From a checkpoint weight's shape alone: 2-D → Linear, 3/4/5-D → Conv1d/2d/3d (stride 1, padding 0),
  // 1-D → LayerNorm. Enough for merging, where only ΔW's shape matters.
  static LayerSpec from_weight_shape(const std::vector<int64_t>& shape, bool bias = true);
};

// The layer's own op with the given weight and bias (bias may be undefined):
// linear / conv{1,2,3}d with the spec's stride, padding, dilation, groups / layer_norm / group_norm.
at::Tensor layer_forward(const at::Tensor& x, const LayerSpec& spec, const at::Tensor& weight,
                         const at::Tensor& bias);

}  // namespace lycoris
