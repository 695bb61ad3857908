#include "lycoris/modules/diag_oft.hpp"

#include <torch/torch.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/diag_oft.hpp"
#include "lycoris/modules/common.hpp"

namespace lycoris {

namespace fn = functional;

DiagOFTImpl::DiagOFTImpl(const LayerSpec& layer, const AdapterOptions& options)
    : AdapterImpl("diag-oft", layer, options), constraint_(options.constraint()) {
  check_oft_options("diag-oft", layer_, options_);
  auto init = fn::diag_oft::init_weights(layer, options.rank(), options.rescaled());
  oft_blocks = register_parameter("oft_blocks", init.first);
  if (init.second.defined()) rescale = register_parameter("rescale", init.second);
  alpha_tensor_ = torch::tensor(constraint_, torch::kFloat32);
}

DiagOFTImpl::DiagOFTImpl(const LayerSpec& layer, const torch::Tensor& blocks, const torch::Tensor& rs,
                         const torch::Tensor& alpha)
    : AdapterImpl("diag-oft", layer, AdapterOptions().algo("diag-oft").rank(blocks.size(-1)).rescaled(rs.defined())),
      constraint_(alpha.defined() ? fn::scalar_value(alpha, "diag-oft", "alpha") : 0.0) {
  oft_blocks = register_parameter("oft_blocks", fn::owned_float(blocks));
  if (rs.defined()) rescale = register_parameter("rescale", fn::owned_float(rs));
  alpha_tensor_ =
      alpha.defined() ? alpha.detach().clone().to(torch::kCPU) : torch::tensor(constraint_, torch::kFloat32);
  options_.constraint(constraint_);
}

torch::Tensor DiagOFTImpl::apply_weight(const torch::Tensor& W, double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return W;
  return fn::diag_oft::apply_weight(W, oft_blocks, rescale, constraint_, m, dropout());
}

torch::Tensor DiagOFTImpl::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                          double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return layer_forward(x, layer_, W, b);
  return fn::diag_oft::bypass_forward(x, layer_, W, b, oft_blocks, rescale, constraint_, m, dropout());
}

NamedTensors DiagOFTImpl::file_tensors() const {
  NamedTensors out{{"oft_blocks", oft_blocks.detach()}};
  if (rescale.defined()) out.emplace_back("rescale", rescale.detach());
  out.emplace_back("alpha", alpha_tensor_.detach());
  return out;
}

void check_oft_options(const std::string& algo, const LayerSpec& layer, const AdapterOptions& o) {
  check_options(algo, layer, o, Hosts::Weights, /*needs_rank=*/false);
  const std::string who = algo + " on " + layer.describe() + ": ";
  if (o.rank() == 0 || o.rank() < -1)
    throw OptionError(who + "rank (block size bound) must be positive or -1, got " + std::to_string(o.rank()));
  if (!(o.constraint() >= 0)) throw OptionError(who + "constraint must be >= 0, got " + std::to_string(o.constraint()));
}

Algorithm diag_oft_algorithm() {
  Algorithm a;
  a.name = "diag-oft";
  a.aliases = {"oft", "diag_oft"};
  a.suffixes = {"oft_blocks", "rescale", "alpha"};
  a.detect = [](const TensorMap& t) {
    auto b = fn::optional(t, "oft_blocks");
    return b.defined() && b.dim() == 3;
  };
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    if (auto why = fn::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": diag-oft: " + why);
    fn::expect_keys(t, {"oft_blocks", "rescale", "alpha"}, module, "diag-oft");
    const auto& blocks = fn::require(t, "oft_blocks", module);
    const int64_t N = blocks.dim() == 3 ? blocks.size(0) : 0, S = blocks.dim() == 3 ? blocks.size(1) : 0;
    if (blocks.dim() != 3 || blocks.size(2) != S || S < 1 || N * S != layer.out_features)
      throw ShapeError(module + ".oft_blocks: expected (N, S, S) with N·S = " + std::to_string(layer.out_features) +
                       " output rows of " + layer.describe() + ", got " + fn::shape_str(blocks.sizes()));
    auto rs = fn::optional(t, "rescale");
    if (rs.defined()) fn::expect_shape(rs, fn::diag_oft::rescale_shape(layer), module, "rescale", "one per output row");
    auto alpha = fn::optional(t, "alpha");
    if (alpha.defined()) fn::scalar_value(alpha, module, "alpha");
    return std::make_shared<DiagOFTImpl>(layer, blocks, rs, alpha);
  };
  a.create = create_adapter<DiagOFTImpl>;
  a.rank = [](const TensorMap& t) -> int64_t {
    auto b = fn::optional(t, "oft_blocks");
    return b.defined() && b.dim() == 3 ? b.size(-1) : 0;
  };
  a.supports = supports_weight_layer;
  return a;
}

}  // namespace lycoris
