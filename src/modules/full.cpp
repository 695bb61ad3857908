#include "lycoris/modules/full.hpp"

#include <torch/torch.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/full.hpp"
#include "modules/common.hpp"

namespace lycoris {

namespace fn = functional;

FullImpl::FullImpl(const LayerSpec& layer, const AdapterOptions& options) : AdapterImpl("full", layer, options) {
  check_options("full", layer_, options_, Hosts::Weights, /*needs_rank=*/false);
  auto init = fn::full::init_weights(layer);
  diff = register_parameter("diff", init.first);
  if (init.second.defined()) diff_b = register_parameter("diff_b", init.second);
}

FullImpl::FullImpl(const LayerSpec& layer, const torch::Tensor& d, const torch::Tensor& db)
    : AdapterImpl("full", layer, AdapterOptions().algo("full")) {
  diff = register_parameter("diff", fn::owned_float(d));
  if (db.defined()) diff_b = register_parameter("diff_b", fn::owned_float(db));
}

torch::Tensor FullImpl::apply_weight(const torch::Tensor& W, double m) {
  skip_ = fn::module_dropped(options_.module_dropout(), is_training());
  if (skip_) return W;
  return fn::full::apply_weight(W, diff, m);
}

torch::Tensor FullImpl::apply_bias(const torch::Tensor& b, double m) {
  if (skip_) return b;
  return fn::full::apply_bias(b, diff_b, m);
}

torch::Tensor FullImpl::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                       double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return layer_forward(x, layer_, W, b);
  auto bias = fn::full::apply_bias(b, diff_b, m);
  if (bias.defined()) bias = bias.to(x.scalar_type());
  return layer_forward(x, layer_, W, bias) + fn::full::bypass_diff(x, layer_, diff, m);
}

NamedTensors FullImpl::file_tensors() const {
  NamedTensors out{{"diff", diff.detach()}};
  if (diff_b.defined()) out.emplace_back("diff_b", diff_b.detach());
  return out;
}

Algorithm full_algorithm() {
  Algorithm a;
  a.name = "full";
  a.suffixes = {"diff", "diff_b"};
  a.detect = [](const TensorMap& t) { return t.count("diff") > 0; };
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    if (auto why = fn::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": full: " + why);
    fn::expect_keys(t, {"diff", "diff_b"}, module, "full");
    const auto& diff = fn::require(t, "diff", module);
    fn::expect_shape(diff, layer.weight_shape(), module, "diff", "the weight of " + layer.describe());
    auto diff_b = fn::optional(t, "diff_b");
    if (diff_b.defined()) fn::expect_shape(diff_b, {layer.out_features}, module, "diff_b", "one per output");
    return std::make_shared<FullImpl>(layer, diff, diff_b);
  };
  a.create = create_adapter<FullImpl>;
  a.rank = [](const TensorMap&) -> int64_t { return 0; };
  a.supports = supports_weight_layer;
  a.options = {};
  a.traits = [](const std::string&, const TensorMap& t) {
    Traits traits;
    add_kind_trait(traits, fn::optional(t, "diff"));
    if (t.count("diff_b")) traits.push_back("diff-b");
    return traits;
  };
  a.peft_refusal = peft_lacks("full", "LoRA-family files have no such tensors");
  return a;
}

}  // namespace lycoris
