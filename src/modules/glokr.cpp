#include "lycoris/modules/glokr.hpp"

#include <torch/torch.h>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/dora.hpp"
#include "modules/common.hpp"
#include "lycoris/modules/lokr.hpp"

namespace lycoris {

namespace F = functional;

namespace {

// Clears the remembered host weight when the call ends (also on exceptions).
struct HostScope {
  torch::Tensor& slot;
  HostScope(torch::Tensor& s, const torch::Tensor& W) : slot(s) { slot = W; }
  ~HostScope() { slot = torch::Tensor(); }
};

}  // namespace

GLoKrImpl::GLoKrImpl(LayerSpec layer, AdapterOptions options) : KronAdapter("glokr", std::move(layer), std::move(options)) {
  setup(F::glokr::init_weights(layer_, fresh_layout(F::glokr::choose_layout), options_.rank(), options_.use_scalar()),
        {});
  finish_fresh();
}

GLoKrImpl::GLoKrImpl(LayerSpec layer, AdapterOptions options, F::glokr::Weights w, double alpha, torch::Tensor ds)
    : KronAdapter("glokr", std::move(layer), std::move(options)) {
  begin_loaded(alpha);
  setup(std::move(w), std::move(ds));
  finish_loaded(F::glokr::rank(weights()), glokr_b_t2.defined(), glokr_b_w1_a.defined());
}

void GLoKrImpl::setup(F::glokr::Weights w, torch::Tensor ds) {
  auto reg = [&](const char* name, const torch::Tensor& t) {
    return t.defined() ? register_parameter(name, t) : torch::Tensor();
  };
  glokr_a_w1 = reg("glokr_a_w1", w.a.w1);
  glokr_a_w2 = reg("glokr_a_w2", w.a.w2);
  glokr_a_w2_a = reg("glokr_a_w2_a", w.a.w2a);
  glokr_a_w2_b = reg("glokr_a_w2_b", w.a.w2b);
  glokr_b_w1 = reg("glokr_b_w1", w.b.w1);
  glokr_b_w1_a = reg("glokr_b_w1_a", w.b.w1a);
  glokr_b_w1_b = reg("glokr_b_w1_b", w.b.w1b);
  glokr_b_w2 = reg("glokr_b_w2", w.b.w2);
  glokr_b_w2_a = reg("glokr_b_w2_a", w.b.w2a);
  glokr_b_w2_b = reg("glokr_b_w2_b", w.b.w2b);
  glokr_b_t2 = reg("glokr_b_t2", w.b.t2);
  setup_common(glokr_a_w1.options(), std::move(ds));
}

F::glokr::Weights GLoKrImpl::weights() const {
  F::glokr::Weights w;
  w.a = {glokr_a_w1, {}, {}, glokr_a_w2, glokr_a_w2_a, glokr_a_w2_b, {}};
  w.b = {glokr_b_w1, glokr_b_w1_a, glokr_b_w1_b, glokr_b_w2, glokr_b_w2_a, glokr_b_w2_b, glokr_b_t2};
  // σ·(W ×_in A + B) = W ×_in ((σA1) ⊗ A2) + (σB1) ⊗ B2
  if (scalar.defined()) {
    w.a.w1 = w.a.w1 * scalar;
    auto& b1 = w.b.w1.defined() ? w.b.w1 : w.b.w1a;
    b1 = b1 * scalar;
  }
  return w;
}

const torch::Tensor& GLoKrImpl::host() const {
  if (!host_.defined())
    throw OptionError("glokr on " + layer_.describe() +
                      ": ΔW depends on the host weight; use apply_weight / bypass_forward");
  return host_;
}

torch::Tensor GLoKrImpl::apply_weight(const torch::Tensor& W, double m) {
  HostScope scope(host_, W);
  return LowRankAdapter::apply_weight(W, m);
}

torch::Tensor GLoKrImpl::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                        double m) {
  HostScope scope(host_, W);
  return LowRankAdapter::bypass_forward(x, W, b, m);
}

torch::Tensor GLoKrImpl::raw_diff() { return F::glokr::diff_weight(layer_, weights(), host(), scale()); }

torch::Tensor GLoKrImpl::raw_bypass(const torch::Tensor& x, double m) {
  return drop_out_channels(F::glokr::bypass_diff(x, layer_, weights(), host(), scale() * m));
}

NamedTensors GLoKrImpl::file_tensors() const {
  NamedTensors out;
  out.emplace_back("alpha", torch::scalar_tensor(alpha_, torch::kFloat32));
  if (dora_scale.defined()) out.emplace_back("dora_scale", dora_scale.detach());
  auto w = weights();
  for (auto [key, t] : {std::pair<const char*, torch::Tensor>{"glokr_a_w1", w.a.w1}, {"glokr_a_w2", w.a.w2},
                        {"glokr_a_w2_a", w.a.w2a}, {"glokr_a_w2_b", w.a.w2b}, {"glokr_b_w1", w.b.w1},
                        {"glokr_b_w1_a", w.b.w1a}, {"glokr_b_w1_b", w.b.w1b}, {"glokr_b_w2", w.b.w2},
                        {"glokr_b_w2_a", w.b.w2a}, {"glokr_b_w2_b", w.b.w2b}, {"glokr_b_t2", w.b.t2}})
    if (t.defined()) out.emplace_back(key, t.detach());
  return out;
}

namespace {

const std::vector<std::string>& glokr_suffixes() {
  static const std::vector<std::string> s = {
      "glokr_a_w1",   "glokr_a_w2",   "glokr_a_w2_a", "glokr_a_w2_b", "glokr_b_w1", "glokr_b_w1_a", "glokr_b_w1_b",
      "glokr_b_w2",   "glokr_b_w2_a", "glokr_b_w2_b", "glokr_b_t2",   "alpha",      "dora_scale"};
  return s;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size()))
    s.replace(pos, from.size(), to);
  return s;
}

// B is a LoKr delta of the layer: validated by the LoKr loader on the tensors renamed glokr_b_* → lokr_*
// (its error messages renamed back), so both algorithms share one set of layout rules.
F::lokr::Weights load_b(const std::string& module, const TensorMap& t, const LayerSpec& layer) {
  TensorMap renamed;
  const std::string prefix = "glokr_b_";
  for (const auto& [key, value] : t)
    if (key.compare(0, prefix.size(), prefix) == 0) renamed["lokr_" + key.substr(prefix.size())] = value;
  auto back = [](const Error& e) { return replace_all(e.what(), "lokr_", "glokr_b_"); };
  AdapterPtr loaded;
  try {
    loaded = lokr_algorithm().load(module, renamed, layer);
  } catch (const ShapeError& e) {
    throw ShapeError(back(e));
  } catch (const KeyError& e) {
    throw KeyError(back(e));
  } catch (const FormatError& e) {
    throw FormatError(back(e));
  }
  const auto& k = dynamic_cast<const LoKrImpl&>(*loaded);
  return {k.lokr_w1, k.lokr_w1_a, k.lokr_w1_b, k.lokr_w2, k.lokr_w2_a, k.lokr_w2_b, k.lokr_t2};
}

AdapterPtr load_glokr(const std::string& module, const TensorMap& t, const LayerSpec& layer) {
  F::expect_keys(t, glokr_suffixes(), module, "glokr");
  if (auto why = F::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": " + why);
  const int64_t I = layer.in_features;
  F::glokr::Weights w;
  // A1 (p, p) with p | I; A2 (q, q) or A2a (q, r), A2b (r, q), q = I / p — sizes from the stored shapes
  const auto& a1 = F::require(t, "glokr_a_w1", module);
  const int64_t p = a1.dim() == 2 ? a1.size(0) : 0;
  if (p < 1 || a1.size(1) != p || I % p != 0)
    throw ShapeError(module + ".glokr_a_w1: expected a square [p, p] with p dividing in_features " +
                     std::to_string(I) + " of " + layer.describe() + ", got " + F::shape_str(a1.sizes()));
  const int64_t q = I / p;
  const std::string why = "glokr_a_w1 [" + std::to_string(p) + ", " + std::to_string(p) + "] on " + layer.describe();
  w.a.w1 = F::owned_float(a1);
  int64_t a_rank = 0;
  if (auto a2 = F::optional(t, "glokr_a_w2"); a2.defined()) {
    if (t.count("glokr_a_w2_a") || t.count("glokr_a_w2_b"))
      throw KeyError(module + ": both 'glokr_a_w2' and 'glokr_a_w2_a'/'glokr_a_w2_b' present (ambiguous A2)");
    F::expect_shape(a2, {q, q}, module, "glokr_a_w2", why);
    w.a.w2 = F::owned_float(a2);
  } else {
    const auto& a2a = F::require(t, "glokr_a_w2_a", module);
    const auto& a2b = F::require(t, "glokr_a_w2_b", module);
    if (a2a.dim() != 2)
      throw ShapeError(module + ".glokr_a_w2_a: expected 2 dims, got " + F::shape_str(a2a.sizes()));
    a_rank = a2a.size(1);
    F::expect_rank(a_rank, a2a, module, "glokr_a_w2_a");
    F::expect_shape(a2a, {q, a_rank}, module, "glokr_a_w2_a", why);
    F::expect_shape(a2b, {a_rank, q}, module, "glokr_a_w2_b", "rank " + std::to_string(a_rank) + " from glokr_a_w2_a");
    w.a.w2a = F::owned_float(a2a);
    w.a.w2b = F::owned_float(a2b);
  }
  w.b = load_b(module, t, layer);
  if (const int64_t b_rank = F::lokr::rank(w.b); a_rank > 0 && b_rank > 0 && a_rank != b_rank)
    throw ShapeError(module + ": A2 has rank " + std::to_string(a_rank) + " but B has rank " + std::to_string(b_rank) +
                     " (one scale alpha / r needs one rank)");
  torch::Tensor ds;
  if (auto d = F::optional(t, "dora_scale"); d.defined()) {
    F::dora::on_out(d, layer.weight_shape(), module);
    ds = F::owned_float(d);
  }
  const double alpha = read_alpha(t, module, F::glokr::rank(w));
  return std::make_shared<GLoKrImpl>(layer, AdapterOptions().algo("glokr"), w, alpha, ds);
}

}  // namespace

Algorithm glokr_algorithm() {
  Algorithm a;
  a.name = "glokr";
  a.suffixes = glokr_suffixes();
  a.detect = [](const TensorMap& t) { return t.count("glokr_a_w1") > 0; };
  a.load = load_glokr;
  a.create = create_adapter<GLoKrImpl>;
  a.rank = [](const TensorMap& t) {
    return stored_size(t, {"glokr_a_w2_b", "glokr_b_w1_b", "glokr_b_t2", "glokr_b_w2_b"});
  };
  a.supports = supports_weight_layer;
  a.options = lokr_options();
  a.traits = [](const std::string&, const TensorMap&) { return Traits{}; };
  a.peft_refusal = peft_lacks("glokr", "LoRA-family files have no such tensors");
  return a;
}

}  // namespace lycoris
