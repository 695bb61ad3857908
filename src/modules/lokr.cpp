#include "lycoris/modules/lokr.hpp"

#include <torch/torch.h>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/dora.hpp"
#include "modules/common.hpp"

namespace lycoris {

namespace F = functional;

void KronAdapter::finish_fresh() {
  rank_ = options_.rank();
  alpha_ = all_full() ? static_cast<double>(rank_) : stored_alpha(options_);
}

void KronAdapter::finish_loaded(int64_t rank, bool tucker, bool decompose_both) {
  rank_ = rank;
  record_loaded(rank, tucker);
  options_.decompose_both(decompose_both).full_matrix(all_full());
}

LoKrImpl::LoKrImpl(LayerSpec layer, AdapterOptions options) : KronAdapter("lokr", std::move(layer), std::move(options)) {
  setup(F::lokr::init_weights(layer_, fresh_layout(F::lokr::choose_layout), options_.rank(), options_.use_scalar()), {});
  finish_fresh();
}

LoKrImpl::LoKrImpl(LayerSpec layer, AdapterOptions options, F::lokr::Weights w, double alpha, torch::Tensor ds)
    : KronAdapter("lokr", std::move(layer), std::move(options)) {
  begin_loaded(alpha);
  setup(std::move(w), std::move(ds));
  finish_loaded(F::lokr::rank(weights()), lokr_t2.defined(), lokr_w1_a.defined());
}

void LoKrImpl::setup(F::lokr::Weights w, torch::Tensor ds) {
  auto reg = [&](const char* name, const torch::Tensor& t) {
    return t.defined() ? register_parameter(name, t) : torch::Tensor();
  };
  lokr_w1 = reg("lokr_w1", w.w1);
  lokr_w1_a = reg("lokr_w1_a", w.w1a);
  lokr_w1_b = reg("lokr_w1_b", w.w1b);
  lokr_w2 = reg("lokr_w2", w.w2);
  lokr_w2_a = reg("lokr_w2_a", w.w2a);
  lokr_w2_b = reg("lokr_w2_b", w.w2b);
  lokr_t2 = reg("lokr_t2", w.t2);
  setup_common((lokr_w1.defined() ? lokr_w1 : lokr_w1_a).options(), std::move(ds));
}

F::lokr::Weights LoKrImpl::weights() const {
  F::lokr::Weights w{lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2};
  if (scalar.defined()) (w.w1.defined() ? w.w1 : w.w1a) = (w.w1.defined() ? w.w1 : w.w1a) * scalar;
  return w;
}

torch::Tensor LoKrImpl::raw_diff() { return F::lokr::diff_weight(layer_, weights(), scale()); }

torch::Tensor LoKrImpl::raw_bypass(const torch::Tensor& x, double m) {
  return drop_out_channels(F::lokr::bypass_diff(x, layer_, weights(), scale() * m));
}

std::unique_ptr<RowKernel> LoKrImpl::delta_kernel(double m, const torch::TensorOptions& opts,
                                                   torch::IntArrayRef shape) const {
  auto w = weights();  // the scalar multiplies W1
  if (!in_compute(opts, {w.w1, w.w1a, w.w1b, w.w2, w.w2a, w.w2b, w.t2})) return nullptr;
  const double c = m * scale();
  auto W1 = F::lokr::w1(w), W2 = F::lokr::w2(layer_, w);
  const int64_t O = shape[0], numel = c10::multiply_integers(shape);
  const int64_t A = W1.size(0), C = W1.size(1), P = W2.size(0);
  if (A * P != O || numel % (O * C) != 0) return nullptr;
  const int64_t QK = numel / (O * C);
  auto w2v = W2.reshape({1, P, 1, QK}).contiguous();
  return std::make_unique<RowKernel>(RowKernel{P, [=](const torch::Tensor& Wr, int64_t r0, int64_t r1) {
                                                 const int64_t u0 = r0 / P, nu = (r1 - r0) / P;
                                                 Wr.view({nu, P, C, QK})
                                                     .addcmul_(W1.narrow(0, u0, nu).reshape({nu, 1, C, 1}), w2v, c);
                                               }});
}

NamedTensors LoKrImpl::file_tensors() const {
  return lokr_file_tensors(weights(), torch::scalar_tensor(alpha_, torch::kFloat32), dora_scale);
}

NamedTensors lokr_file_tensors(const F::lokr::Weights& w, const torch::Tensor& alpha, const torch::Tensor& dora_scale) {
  NamedTensors out;
  out.emplace_back("alpha", alpha.detach());
  if (dora_scale.defined()) out.emplace_back("dora_scale", dora_scale.detach());
  for (auto [key, t] : {std::pair<const char*, torch::Tensor>{"lokr_w1", w.w1}, {"lokr_w1_a", w.w1a},
                        {"lokr_w1_b", w.w1b}, {"lokr_w2", w.w2}, {"lokr_w2_a", w.w2a}, {"lokr_w2_b", w.w2b},
                        {"lokr_t2", w.t2}})
    if (t.defined()) out.emplace_back(key, t.detach());
  return out;
}

namespace {

AdapterPtr load_lokr(const std::string& module, const TensorMap& t, const LayerSpec& layer) {
  F::expect_keys(t,
                 {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha",
                  "dora_scale"},
                 module, "lokr");
  if (auto why = F::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": " + why);
  auto opt = [&](const char* k) { return F::optional(t, k); };
  auto two_d = [&](const torch::Tensor& x, const char* key) {
    if (x.dim() != 2) throw ShapeError(module + "." + key + ": expected 2 dims, got " + F::shape_str(x.sizes()));
  };
  const int64_t O = layer.out_features, I = layer.in_features, k = layer.kernel_numel();
  F::lokr::Weights w;
  // W1 (a, c)
  int64_t a, c;
  if (auto w1 = opt("lokr_w1"); w1.defined()) {
    if (t.count("lokr_w1_a") || t.count("lokr_w1_b"))
      throw KeyError(module + ": both 'lokr_w1' and 'lokr_w1_a'/'lokr_w1_b' present (ambiguous W1)");
    two_d(w1, "lokr_w1");
    a = w1.size(0);
    c = w1.size(1);
    w.w1 = F::owned_float(w1);
  } else {
    const auto& w1a = F::require(t, "lokr_w1_a", module);
    const auto& w1b = F::require(t, "lokr_w1_b", module);
    two_d(w1a, "lokr_w1_a");
    two_d(w1b, "lokr_w1_b");
    a = w1a.size(0);
    c = w1b.size(1);
    F::expect_rank(w1a.size(1), w1a, module, "lokr_w1_a");
    F::expect_shape(w1b, {w1a.size(1), c}, module, "lokr_w1_b", "rank " + std::to_string(w1a.size(1)) + " from lokr_w1_a");
    w.w1a = F::owned_float(w1a);
    w.w1b = F::owned_float(w1b);
  }
  if (a < 1 || c < 1 || O % a != 0 || I % c != 0)
    throw ShapeError(module + ": W1 of shape [" + std::to_string(a) + ", " + std::to_string(c) + "] (" +
                     (w.w1.defined() ? "lokr_w1" : "lokr_w1_a · lokr_w1_b") + ") does not divide " + layer.describe());
  const int64_t p = O / a, q = I / c;
  std::vector<int64_t> kernel = layer.kernel;
  auto with_kernel = [&](std::vector<int64_t> s) {
    s.insert(s.end(), kernel.begin(), kernel.end());
    return s;
  };
  const std::string why = "W1 [" + std::to_string(a) + ", " + std::to_string(c) + "] on " + layer.describe();
  // W2 (p, q, *K)
  if (auto w2 = opt("lokr_w2"); w2.defined()) {
    if (t.count("lokr_w2_a") || t.count("lokr_w2_b") || t.count("lokr_t2"))
      throw KeyError(module + ": both 'lokr_w2' and 'lokr_w2_a'/'lokr_w2_b'/'lokr_t2' present (ambiguous W2)");
    F::expect_shape(w2, with_kernel({p, q}), module, "lokr_w2", why);
    w.w2 = F::owned_float(w2);
  } else {
    const auto& w2a = F::require(t, "lokr_w2_a", module);
    const auto& w2b = F::require(t, "lokr_w2_b", module);
    two_d(w2a, "lokr_w2_a");
    two_d(w2b, "lokr_w2_b");
    if (auto t2 = opt("lokr_t2"); t2.defined()) {
      if (!layer.is_conv()) throw ShapeError(module + ".lokr_t2: Tucker factor on a non-conv layer " + layer.describe());
      const int64_t r = t2.dim() > 0 ? t2.size(0) : 0;
      F::expect_rank(r, t2, module, "lokr_t2");
      F::expect_shape(t2, with_kernel({r, r}), module, "lokr_t2", why);
      F::expect_shape(w2a, {r, p}, module, "lokr_w2_a", "Tucker rank " + std::to_string(r) + ", " + why);
      F::expect_shape(w2b, {r, q}, module, "lokr_w2_b", "Tucker rank " + std::to_string(r) + ", " + why);
      w.t2 = F::owned_float(t2);
    } else {
      const int64_t r = w2a.size(1);
      F::expect_rank(r, w2a, module, "lokr_w2_a");
      F::expect_shape(w2a, {p, r}, module, "lokr_w2_a", why);
      F::expect_shape(w2b, {r, q * k}, module, "lokr_w2_b", "rank " + std::to_string(r) + " from lokr_w2_a, " + why);
    }
    w.w2a = F::owned_float(w2a);
    w.w2b = F::owned_float(w2b);
  }
  torch::Tensor ds;
  if (auto d = opt("dora_scale"); d.defined()) {
    F::dora::on_out(d, layer.weight_shape(), module);
    ds = F::owned_float(d);
  }
  const int64_t r = F::lokr::rank(w);
  const double alpha = read_alpha(t, module, r);
  return std::make_shared<LoKrImpl>(layer, AdapterOptions().algo("lokr"), w, alpha, ds);
}

}  // namespace

namespace {
int64_t lokr_stored_rank(const TensorMap& t) { return stored_size(t, {"lokr_w1_b", "lokr_t2", "lokr_w2_b"}); }
}  // namespace

Algorithm lokr_algorithm() {
  Algorithm a;
  a.name = "lokr";
  a.suffixes = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"};
  a.detect = [](const TensorMap& t) { return t.count("lokr_w1") > 0 || t.count("lokr_w1_a") > 0; };
  a.load = load_lokr;
  a.create = create_adapter<LoKrImpl>;
  a.rank = lokr_stored_rank;
  a.supports = supports_weight_layer;
  a.options = lokr_options();
  a.traits = [](const std::string& module, const TensorMap& t) {
    const int64_t rank = lokr_stored_rank(t);
    const double alpha = alpha_or_nan(module, t);
    auto traits = low_rank_traits(module, t, rank);
    auto w2 = F::optional(t, "lokr_w2"), t2 = F::optional(t, "lokr_t2");
    add_kind_trait(traits, w2.defined() ? w2 : t2);
    if (t2.defined()) traits.push_back("tucker");
    if (w2.defined() && w2.dim() > 2) traits.push_back("lokr-w2-whole-kernel");
    if (rank == 0 && !std::isnan(alpha) && alpha != 1.0) traits.push_back("lokr-whole-factors-alpha");
    if (rank == 1 && !std::isnan(alpha) && alpha != 1.0) traits.push_back("lokr-rank1-alpha");
    auto w1b = F::optional(t, "lokr_w1_b"), w2b = F::optional(t, "lokr_w2_b");
    if (w1b.defined() && w2b.defined() && w1b.dim() > 0 && w2b.dim() > 0 && w1b.size(0) != w2b.size(0))
      traits.push_back("lokr-ranks-differ");
    return traits;
  };
  // the scale is carried by W1 (ΔW is linear in it)
  a.to_peft = [](const TensorMap& t, double scale) {
    return low_rank_peft_form("lokr", t, scale, t.count("lokr_w1") ? "lokr_w1" : "lokr_w1_a");
  };
  a.from_peft = [](TensorMap& t, double scale) {
    low_rank_from_peft(t, scale, lokr_stored_rank(t), t.count("lokr_w1") ? "lokr_w1" : "lokr_w1_a");
  };
  return a;
}

}  // namespace lycoris
