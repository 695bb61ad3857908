#include "lycoris/modules/glora.hpp"

#include <torch/torch.h>

#include <cmath>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "modules/common.hpp"
#include "lycoris/modules/lora.hpp"

namespace lycoris {

namespace fn = functional;

GLoRAImpl::GLoRAImpl(const LayerSpec& layer, const AdapterOptions& options) : AdapterImpl("glora", layer, options) {
  check_options("glora", layer_, options_, Hosts::Weights, /*needs_rank=*/true);
  const int64_t r = options.rank();
  auto w = fn::glora::init_weights(layer, r, options.use_scalar());
  a1 = register_parameter("a1", w.a1);
  a2 = register_parameter("a2", w.a2);
  b1 = register_parameter("b1", w.b1);
  b2 = register_parameter("b2", w.b2);
  if (options.use_scalar()) scalar = register_parameter("scalar", torch::zeros({}));
  const double user_alpha = options.alpha() == 0 ? static_cast<double>(r) : options.alpha();
  alpha_ = options.rs_lora() ? user_alpha * std::sqrt(static_cast<double>(r)) : user_alpha;
  alpha_tensor_ = torch::tensor(alpha_, torch::kFloat32);
}

GLoRAImpl::GLoRAImpl(const LayerSpec& layer, const fn::glora::Weights& w, const torch::Tensor& alpha)
    : AdapterImpl("glora", layer, AdapterOptions().algo("glora").rank(w.a2.size(0))) {
  a1 = register_parameter("a1", fn::owned_float(w.a1));
  a2 = register_parameter("a2", fn::owned_float(w.a2));
  b1 = register_parameter("b1", fn::owned_float(w.b1));
  b2 = register_parameter("b2", fn::owned_float(w.b2));
  alpha_ = alpha.defined() ? fn::scalar_value(alpha, "glora", "alpha") : static_cast<double>(a2.size(0));
  alpha_tensor_ =
      alpha.defined() ? alpha.detach().clone().to(torch::kCPU) : torch::tensor(alpha_, torch::kFloat32);
  options_.alpha(alpha_);
}

fn::glora::Weights GLoRAImpl::weights() const {
  if (!scalar.defined()) return {a1, a2, b1, b2};
  return {a1, a2 * scalar, b1, b2 * scalar};
}

torch::Tensor GLoRAImpl::apply_weight(const torch::Tensor& W, double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return W;
  return fn::glora::apply_weight(W, weights(), scale(), m);
}

torch::Tensor GLoRAImpl::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                        double m) {
  auto y = layer_forward(x, layer_, W, b);
  if (fn::module_dropped(options_.module_dropout(), is_training())) return y;
  fn::glora::BypassDropout drop;
  if (is_training()) drop = {options_.dropout(), options_.rank_dropout(), options_.rank_dropout_scale()};
  return y + fn::glora::bypass_diff(x, layer_, W, weights(), scale(), m, drop);
}

NamedTensors GLoRAImpl::file_tensors() const {
  auto w = weights();
  return {{"alpha", alpha_tensor_.detach()},
          {"a1.weight", w.a1.detach()},
          {"a2.weight", w.a2.detach()},
          {"b1.weight", w.b1.detach()},
          {"b2.weight", w.b2.detach()}};
}

Algorithm glora_algorithm() {
  Algorithm a;
  a.name = "glora";
  a.suffixes = {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"};
  a.detect = [](const TensorMap& t) { return t.count("a1.weight") > 0; };
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    if (auto why = fn::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": glora: " + why);
    fn::expect_keys(t, {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}, module, "glora");
    fn::glora::Weights w{fn::require(t, "a1.weight", module), fn::require(t, "a2.weight", module),
                         fn::require(t, "b1.weight", module), fn::require(t, "b2.weight", module)};
    if (w.a2.dim() < 2) fn::expect_shape(w.a2, fn::glora::a2_shape(layer, 1), module, "a2.weight", "(rank, in)");
    const int64_t r = w.a2.size(0);
    fn::expect_rank(r, w.a2, module, "a2.weight");
    const std::string why = "rank " + std::to_string(r) + " from a2.weight, " + layer.describe();
    fn::expect_shape(w.a1, fn::glora::a1_shape(layer, r), module, "a1.weight", why);
    fn::expect_shape(w.a2, fn::glora::a2_shape(layer, r), module, "a2.weight", why);
    fn::expect_shape(w.b1, fn::glora::b1_shape(layer, r), module, "b1.weight", why);
    fn::expect_shape(w.b2, fn::glora::b2_shape(layer, r), module, "b2.weight", why);
    auto alpha = fn::optional(t, "alpha");
    read_alpha(t, module, r);  // validates shape, dtype and range
    return std::make_shared<GLoRAImpl>(layer, w, alpha);
  };
  a.create = create_adapter<GLoRAImpl>;
  a.rank = [](const TensorMap& t) { return stored_size(t, {"a2.weight"}); };
  a.supports = supports_weight_layer;
  a.options = {"use_scalar", "rs_lora", "dropout", "rank_dropout", "rank_dropout_scale"};
  a.traits = [](const std::string& module, const TensorMap& t) {
    Traits traits;
    add_alpha_traits(traits, stored_size(t, {"a2.weight"}), alpha_or_nan(module, t));
    return traits;
  };
  a.peft_refusal = peft_lacks("glora", "GLoRA is a different algorithm");
  return a;
}

}  // namespace lycoris
