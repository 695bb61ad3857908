#include "lycoris/modules/ia3.hpp"

#include <torch/torch.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/ia3.hpp"
#include "modules/common.hpp"

namespace lycoris {

namespace fn = functional;

IA3Impl::IA3Impl(const LayerSpec& layer, const AdapterOptions& options)
    : AdapterImpl("ia3", layer, options), on_input_(options.train_on_input()) {
  check_options("ia3", layer_, options_, Hosts::Weights, /*needs_rank=*/false);
  weight = register_parameter("weight", fn::ia3::init_weights(layer, on_input_));
}

IA3Impl::IA3Impl(const LayerSpec& layer, const torch::Tensor& w, bool on_input)
    : AdapterImpl("ia3", layer, AdapterOptions().algo("ia3").train_on_input(on_input)), on_input_(on_input) {
  weight = register_parameter("weight", fn::owned_float(w));
}

torch::Tensor IA3Impl::apply_weight(const torch::Tensor& W, double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return W;
  return fn::ia3::apply_weight(W, weight, on_input_, m);
}

torch::Tensor IA3Impl::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                      double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return layer_forward(x, layer_, W, b);
  return fn::ia3::bypass_forward(x, layer_, W, b, weight, on_input_, m);
}

// The same fp32 ops as functional::ia3::apply_weight, on the rows of a chunk.
std::unique_ptr<RowKernel> IA3Impl::row_kernel(double m, const torch::TensorOptions& opts,
                                               torch::IntArrayRef shape) const {
  if (is_training() || shape.size() < 2) return nullptr;
  const auto f = weight.detach().to(opts).reshape({-1}) * m + 1;
  if (!on_input_) {
    const auto rows = f.view({-1, 1});
    return std::make_unique<RowKernel>(
        RowKernel{1, [=](const torch::Tensor& Wr, int64_t r0, int64_t r1) { Wr.mul_(rows.narrow(0, r0, r1 - r0)); }});
  }
  const int64_t I = shape[1], K = c10::multiply_integers(shape) / (shape[0] * I);
  const auto cols = f.view({1, I, 1});
  return std::make_unique<RowKernel>(
      RowKernel{1, [=](const torch::Tensor& Wr, int64_t, int64_t) { Wr.view({Wr.size(0), I, K}).mul_(cols); }});
}

NamedTensors IA3Impl::file_tensors() const {
  return {{"weight", weight.detach()},
          {"on_input", torch::tensor(static_cast<int64_t>(on_input_), torch::kInt64)}};
}

Algorithm ia3_algorithm() {
  Algorithm a;
  a.name = "ia3";
  a.aliases = {"(ia)^3"};
  a.suffixes = {"on_input", "weight"};
  a.detect = [](const TensorMap& t) { return t.count("on_input") > 0; };
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    if (auto why = fn::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": ia3: " + why);
    fn::expect_keys(t, {"weight", "on_input"}, module, "ia3");
    const double flag = fn::scalar_value(fn::require(t, "on_input", module), module, "on_input");
    if (flag != 0 && flag != 1)
      throw ShapeError(module + ".on_input: expected 0 or 1, got " + std::to_string(flag));
    const bool on_input = flag == 1;
    const auto& w = fn::require(t, "weight", module);
    fn::expect_shape(w, fn::ia3::vector_shape(layer, on_input), module, "weight",
                     std::string("one per ") + (on_input ? "input" : "output") + " channel of " + layer.describe());
    return std::make_shared<IA3Impl>(layer, w, on_input);
  };
  a.create = create_adapter<IA3Impl>;
  a.rank = [](const TensorMap&) -> int64_t { return 0; };
  a.supports = supports_weight_layer;
  a.options = {"train_on_input"};
  a.traits = [](const std::string&, const TensorMap& t) {
    Traits traits;
    // a Linear's vector is (C,), a conv's (1, C, 1, …) with the weight's dims
    auto w = fn::optional(t, "weight");
    if (w.defined() && w.dim() == 1) traits.push_back("linear");
    else add_kind_trait(traits, w);
    return traits;
  };
  a.peft_refusal = peft_lacks("ia3", "IA3 is a separate tuner with multiplicative ia3_l = 1 + w");
  return a;
}

}  // namespace lycoris
