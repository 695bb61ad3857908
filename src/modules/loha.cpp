#include "lycoris/modules/loha.hpp"

#include <torch/torch.h>

#include "exec/scratch.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/dora.hpp"
#include "modules/common.hpp"

namespace lycoris {

namespace F = functional;

LoHaImpl::LoHaImpl(LayerSpec layer, AdapterOptions options) : LowRankAdapter("loha", std::move(layer), std::move(options)) {
  check_low_rank_options(layer_, options_, "loha");
  alpha_ = stored_alpha(options_);
  setup(F::loha::init_weights(layer_, options_.rank(), options_.tucker(), options_.use_scalar()), {});
}

LoHaImpl::LoHaImpl(LayerSpec layer, AdapterOptions options, F::loha::Weights w, double alpha, torch::Tensor ds)
    : LowRankAdapter("loha", std::move(layer), std::move(options)) {
  begin_loaded(alpha);
  setup(std::move(w), std::move(ds));
  record_loaded(rank(), hada_t1.defined());
}

void LoHaImpl::setup(F::loha::Weights w, torch::Tensor ds) {
  hada_w1_a = register_parameter("hada_w1_a", w.w1a);
  hada_w1_b = register_parameter("hada_w1_b", w.w1b);
  hada_w2_a = register_parameter("hada_w2_a", w.w2a);
  hada_w2_b = register_parameter("hada_w2_b", w.w2b);
  if (w.t1.defined()) {
    hada_t1 = register_parameter("hada_t1", w.t1);
    hada_t2 = register_parameter("hada_t2", w.t2);
  }
  setup_common(w.w1a.options(), std::move(ds));
}

F::loha::Weights LoHaImpl::weights() const {
  return {hada_w1_a * scalar, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2};
}

torch::Tensor LoHaImpl::raw_diff() { return F::loha::diff_weight(layer_, weights(), scale()); }

torch::Tensor LoHaImpl::raw_bypass(const torch::Tensor& x, double m) {
  auto w = weights();
  if (!F::loha::bypass_is_cheaper(layer_, w)) return {};  // materialise instead
  return drop_out_channels(F::loha::bypass_diff(x, layer_, w, scale() * m));
}

std::unique_ptr<RowKernel> LoHaImpl::delta_kernel(double m, const torch::TensorOptions& opts, torch::IntArrayRef) const {
  if (hada_t1.defined() || !in_compute(opts, {hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b})) return nullptr;
  const double c = m * scale();
  auto w1a = hada_w1_a * scalar, w1b = hada_w1_b.contiguous(), w2a = hada_w2_a.contiguous(),
       w2b = hada_w2_b.contiguous();
  return std::make_unique<RowKernel>(RowKernel{1, [=](const torch::Tensor& Wr, int64_t r0, int64_t r1) {
                                                 const int64_t n = r1 - r0;
                                                 // both products in this thread's buffers
                                                 thread_local torch::Tensor b1, b2;
                                                 auto P1 = exec::scratch(b1, n, Wr.size(1), Wr.options()),
                                                      P2 = exec::scratch(b2, n, Wr.size(1), Wr.options());
                                                 torch::mm_out(P1, w1a.narrow(0, r0, n), w1b);
                                                 torch::mm_out(P2, w2a.narrow(0, r0, n), w2b);
                                                 Wr.addcmul_(P1, P2, c);
                                               }});
}

NamedTensors LoHaImpl::file_tensors() const {
  return loha_file_tensors(weights(), torch::scalar_tensor(alpha_, torch::kFloat32), dora_scale);
}

NamedTensors loha_file_tensors(const F::loha::Weights& w, const torch::Tensor& alpha, const torch::Tensor& dora_scale) {
  NamedTensors out;
  out.emplace_back("alpha", alpha.detach());
  if (dora_scale.defined()) out.emplace_back("dora_scale", dora_scale.detach());
  for (auto [key, t] : {std::pair<const char*, torch::Tensor>{"hada_w1_a", w.w1a}, {"hada_w1_b", w.w1b},
                        {"hada_w2_a", w.w2a}, {"hada_w2_b", w.w2b}, {"hada_t1", w.t1}, {"hada_t2", w.t2}})
    if (t.defined()) out.emplace_back(key, t.detach());
  return out;
}

namespace {

AdapterPtr load_loha(const std::string& module, const TensorMap& t, const LayerSpec& layer) {
  F::expect_keys(t, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"},
                 module, "loha");
  if (auto why = F::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": " + why);
  const auto& w1a = F::require(t, "hada_w1_a", module);
  const auto& w1b = F::require(t, "hada_w1_b", module);
  const auto& w2a = F::require(t, "hada_w2_a", module);
  const auto& w2b = F::require(t, "hada_w2_b", module);
  const int64_t O = layer.out_features, I = layer.in_features, k = layer.kernel_numel();
  const bool tucker = t.count("hada_t1") || t.count("hada_t2");
  auto rank_of = [&](const torch::Tensor& b, const char* key) {
    if (b.dim() != 2) throw ShapeError(module + "." + key + ": expected 2 dims, got " + F::shape_str(b.sizes()));
    return b.size(0);
  };
  const int64_t r1 = rank_of(w1b, "hada_w1_b"), r2 = rank_of(w2b, "hada_w2_b");
  F::expect_rank(r1, w1b, module, "hada_w1_b");
  F::expect_rank(r2, w2b, module, "hada_w2_b");
  F::loha::Weights w;
  if (tucker) {
    if (!layer.is_conv()) throw ShapeError(module + ".hada_t1: Tucker factors on a non-conv layer " + layer.describe());
    const auto& t1 = F::require(t, "hada_t1", module);
    const auto& t2 = F::require(t, "hada_t2", module);
    auto core = [&](int64_t r) {
      std::vector<int64_t> s{r, r};
      s.insert(s.end(), layer.kernel.begin(), layer.kernel.end());
      return s;
    };
    const std::string why = "Tucker LoHa on " + layer.describe();
    F::expect_shape(w1b, {r1, I}, module, "hada_w1_b", why);
    F::expect_shape(w1a, {r1, O}, module, "hada_w1_a", why + ", rank " + std::to_string(r1));
    F::expect_shape(t1, core(r1), module, "hada_t1", why + ", rank " + std::to_string(r1));
    F::expect_shape(w2b, {r2, I}, module, "hada_w2_b", why);
    F::expect_shape(w2a, {r2, O}, module, "hada_w2_a", why + ", rank " + std::to_string(r2));
    F::expect_shape(t2, core(r2), module, "hada_t2", why + ", rank " + std::to_string(r2));
    w.t1 = F::owned_float(t1);
    w.t2 = F::owned_float(t2);
  } else {
    const std::string why = "LoHa on " + layer.describe();
    F::expect_shape(w1b, {r1, I * k}, module, "hada_w1_b", why);
    F::expect_shape(w1a, {O, r1}, module, "hada_w1_a", why + ", rank " + std::to_string(r1));
    F::expect_shape(w2b, {r2, I * k}, module, "hada_w2_b", why);
    F::expect_shape(w2a, {O, r2}, module, "hada_w2_a", why + ", rank " + std::to_string(r2));
  }
  w.w1a = F::owned_float(w1a);
  w.w1b = F::owned_float(w1b);
  w.w2a = F::owned_float(w2a);
  w.w2b = F::owned_float(w2b);
  torch::Tensor ds;
  if (auto d = F::optional(t, "dora_scale"); d.defined()) {
    F::dora::on_out(d, layer.weight_shape(), module);
    ds = F::owned_float(d);
  }
  return std::make_shared<LoHaImpl>(layer, AdapterOptions().algo("loha"), w, read_alpha(t, module, r1), ds);
}

}  // namespace

Algorithm loha_algorithm() {
  Algorithm a;
  a.name = "loha";
  a.suffixes = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"};
  a.detect = [](const TensorMap& t) { return t.count("hada_w1_a") > 0; };
  a.load = load_loha;
  a.create = create_adapter<LoHaImpl>;
  a.rank = [](const TensorMap& t) { return stored_size(t, {"hada_w1_b"}); };
  a.supports = supports_weight_layer;
  a.options = low_rank_options();
  a.traits = [](const std::string& module, const TensorMap& t) {
    auto traits = low_rank_traits(module, t, stored_size(t, {"hada_w1_b"}));
    auto t1 = F::optional(t, "hada_t1");
    add_kind_trait(traits, t1);
    if (t1.defined()) traits.push_back("tucker");
    return traits;
  };
  a.to_peft = [](const TensorMap& t, double scale) { return low_rank_peft_form("loha", t, scale, "hada_w1_a"); };
  a.from_peft = [](TensorMap& t, double scale) { low_rank_from_peft(t, scale, stored_size(t, {"hada_w1_b"}), "hada_w1_a"); };
  return a;
}

}  // namespace lycoris
