#include "lycoris/modules/boft.hpp"

#include <torch/torch.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/boft.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/diag_oft.hpp"
#include "lycoris/modules/common.hpp"
#include "lycoris/modules/diag_oft.hpp"

namespace lycoris {

namespace fn = functional;

BOFTImpl::BOFTImpl(const LayerSpec& layer, const AdapterOptions& options)
    : AdapterImpl("boft", layer, options), constraint_(options.constraint()) {
  check_oft_options("boft", layer_, options_);  // and OptionError below when no butterfly layout exists
  auto init = fn::boft::init_weights(layer, options.rank(), options.rescaled());
  oft_blocks = register_parameter("oft_blocks", init.first);
  if (init.second.defined()) rescale = register_parameter("rescale", init.second);
  alpha_tensor_ = torch::tensor(constraint_, torch::kFloat32);
}

BOFTImpl::BOFTImpl(const LayerSpec& layer, const torch::Tensor& blocks, const torch::Tensor& rs,
                   const torch::Tensor& alpha)
    : AdapterImpl("boft", layer, AdapterOptions().algo("boft").rank(blocks.size(-1)).rescaled(rs.defined())),
      constraint_(alpha.defined() ? fn::scalar_value(alpha, "boft", "alpha") : 0.0) {
  oft_blocks = register_parameter("oft_blocks", fn::owned_float(blocks));
  if (rs.defined()) rescale = register_parameter("rescale", fn::owned_float(rs));
  alpha_tensor_ =
      alpha.defined() ? alpha.detach().clone().to(torch::kCPU) : torch::tensor(constraint_, torch::kFloat32);
  options_.constraint(constraint_);
}

torch::Tensor BOFTImpl::apply_weight(const torch::Tensor& W, double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return W;
  return fn::boft::apply_weight(W, oft_blocks, rescale, constraint_, m);
}

torch::Tensor BOFTImpl::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                       double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return layer_forward(x, layer_, W, b);
  return fn::boft::bypass_forward(x, layer_, W, b, oft_blocks, rescale, constraint_, m);
}

NamedTensors BOFTImpl::file_tensors() const {
  NamedTensors out{{"oft_blocks", oft_blocks.detach()}};
  if (rescale.defined()) out.emplace_back("rescale", rescale.detach());
  out.emplace_back("alpha", alpha_tensor_.detach());
  return out;
}

Algorithm boft_algorithm() {
  Algorithm a;
  a.name = "boft";
  a.suffixes = {"oft_blocks", "rescale", "alpha"};
  a.detect = [](const TensorMap& t) {
    auto b = fn::optional(t, "oft_blocks");
    return b.defined() && b.dim() == 4;
  };
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    if (auto why = fn::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": boft: " + why);
    fn::expect_keys(t, {"oft_blocks", "rescale", "alpha"}, module, "boft");
    const auto& blocks = fn::require(t, "oft_blocks", module);
    bool ok = blocks.dim() == 4;
    int64_t M = 0, N = 0, S = 0;
    if (ok) {
      M = blocks.size(0), N = blocks.size(1), S = blocks.size(2);
      ok = M >= 1 && M < 62 && blocks.size(3) == S && S >= 2 && S % 2 == 0 && N >= 1 && (N & (N - 1)) == 0 &&
           (int64_t{1} << (M - 1)) == N && N * S == layer.out_features;
    }
    if (!ok)
      throw ShapeError(module + ".oft_blocks: expected (M, N, S, S) with S even, N = 2^(M-1) and N·S = " +
                       std::to_string(layer.out_features) + " output rows of " + layer.describe() + ", got " +
                       fn::shape_str(blocks.sizes()));
    auto rs = fn::optional(t, "rescale");
    if (rs.defined()) fn::expect_shape(rs, fn::diag_oft::rescale_shape(layer), module, "rescale", "one per output row");
    auto alpha = fn::optional(t, "alpha");
    if (alpha.defined()) fn::scalar_value(alpha, module, "alpha");
    return std::make_shared<BOFTImpl>(layer, blocks, rs, alpha);
  };
  a.create = create_adapter<BOFTImpl>;
  a.rank = [](const TensorMap& t) -> int64_t {
    auto b = fn::optional(t, "oft_blocks");
    return b.defined() && b.dim() == 4 ? b.size(-1) : 0;
  };
  a.supports = supports_weight_layer;
  return a;
}

}  // namespace lycoris
