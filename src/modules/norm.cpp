#include "lycoris/modules/norm.hpp"

#include <torch/torch.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/full.hpp"
#include "lycoris/functional/norm.hpp"
#include "modules/common.hpp"

namespace lycoris {

namespace fn = functional;

NormImpl::NormImpl(const LayerSpec& layer, const AdapterOptions& options) : AdapterImpl("norm", layer, options) {
  // the reference marks a non-norm host "unsupported" and does nothing; rejecting it is clearer (docs/training.md#option-checks)
  check_options("norm", layer_, options_, Hosts::Norms, /*needs_rank=*/false);
  auto init = fn::norm::init_weights(layer);
  w_norm = register_parameter("w_norm", init.first);
  b_norm = register_parameter("b_norm", init.second);
}

NormImpl::NormImpl(const LayerSpec& layer, const torch::Tensor& w, const torch::Tensor& b)
    : AdapterImpl("norm", layer, AdapterOptions().algo("norm")) {
  w_norm = register_parameter("w_norm", fn::owned_float(w));
  if (b.defined()) b_norm = register_parameter("b_norm", fn::owned_float(b));
}

std::pair<torch::Tensor, torch::Tensor> NormImpl::effective() {
  const double p = options_.rank_dropout();
  if (!is_training() || p <= 0) return {w_norm, b_norm};
  mask_ = fn::keep_mask(w_norm.size(0), p, options_.rank_dropout_scale(), w_norm.options());
  return {w_norm * mask_, b_norm.defined() ? b_norm * mask_ : b_norm};
}

torch::Tensor NormImpl::apply_weight(const torch::Tensor& w, double m) {
  skip_ = fn::module_dropped(options_.module_dropout(), is_training());
  mask_ = torch::Tensor();
  if (skip_) return w;
  return fn::full::apply_weight(w, effective().first, m);
}

torch::Tensor NormImpl::apply_bias(const torch::Tensor& b, double m) {
  if (skip_) return b;
  auto bn = b_norm;
  if (bn.defined() && mask_.defined()) bn = bn * mask_;
  return fn::full::apply_bias(b, bn, m);
}

torch::Tensor NormImpl::bypass_forward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                                       double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return layer_forward(x, layer_, w, b);
  auto eff = effective();
  return layer_forward(x, layer_, w, b) + fn::norm::bypass_diff(x, layer_, eff.first, eff.second, m);
}

NamedTensors NormImpl::file_tensors() const {
  NamedTensors out{{"w_norm", w_norm.detach()}};
  if (b_norm.defined()) out.emplace_back("b_norm", b_norm.detach());
  return out;
}

Algorithm norm_algorithm() {
  Algorithm a;
  a.name = "norm";
  a.suffixes = {"w_norm", "b_norm"};
  a.detect = [](const TensorMap& t) { return t.count("w_norm") > 0; };
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    if (auto why = unsupported_host(layer, Hosts::Norms); !why.empty()) throw ShapeError(module + ": norm: " + why);
    fn::expect_keys(t, {"w_norm", "b_norm"}, module, "norm");
    const auto& w = fn::require(t, "w_norm", module);
    fn::expect_shape(w, {layer.out_features}, module, "w_norm", "one per channel of " + layer.describe());
    auto b = fn::optional(t, "b_norm");
    if (b.defined()) fn::expect_shape(b, {layer.out_features}, module, "b_norm", "one per channel");
    return std::make_shared<NormImpl>(layer, w, b);
  };
  a.create = create_adapter<NormImpl>;
  a.rank = [](const TensorMap&) -> int64_t { return 0; };
  a.supports = [](const LayerSpec& layer) { return layer.is_norm(); };
  a.options = {"rank_dropout", "rank_dropout_scale"};
  a.traits = [](const std::string&, const TensorMap& t) {
    return t.count("b_norm") ? Traits{} : Traits{"no-b-norm"};
  };
  a.peft_refusal = peft_lacks("norm", "LoRA-family files have no such tensors");
  return a;
}

}  // namespace lycoris
