#include "lycoris/modules/lora.hpp"

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/dora.hpp"
#include "lycoris/modules/common.hpp"

namespace lycoris {

namespace F = functional;

// ---------------------------------------------------------------- shared low-rank helpers

void check_low_rank_options(const LayerSpec& layer, const AdapterOptions& o, const std::string& algo) {
  check_options(algo, layer, o, Hosts::Weights, /*needs_rank=*/true);
}

double stored_alpha(const AdapterOptions& o) {
  const double r = static_cast<double>(o.rank());
  const double a = o.alpha() == 0.0 ? r : o.alpha();
  return o.rs_lora() ? a * r / std::sqrt(r) : a;
}

double read_alpha(const TensorMap& tensors, const std::string& module, int64_t rank) {
  auto a = F::optional(tensors, "alpha");
  if (!a.defined()) return static_cast<double>(rank);
  const double alpha = F::scalar_value(a, module, "alpha");
  // the scale alpha / rank is applied, and alpha saved, in float32
  if (std::isfinite(alpha) && std::abs(alpha) > std::numeric_limits<float>::max()) {
    std::ostringstream os;
    os << module << ".alpha: " << alpha << " is beyond the float32 range";
    throw FormatError(os.str());
  }
  return alpha;
}

// ---------------------------------------------------------------- file reading

LoRAFile read_lora_file(const std::string& module, const TensorMap& t, const LayerSpec& layer) {
  F::expect_keys(t,
                 {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "bias_indices",
                  "bias_values", "bias_size"},
                 module, "lora");
  if (auto why = F::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": " + why);
  const auto& up = F::require(t, "lora_up.weight", module);
  const auto& down = F::require(t, "lora_down.weight", module);
  auto mid = F::optional(t, "lora_mid.weight");
  const int64_t O = layer.out_features, I = layer.in_features;
  const size_t nk = layer.kernel.size();
  if (down.dim() < 1) F::expect_shape(down, {-1, I}, module, "lora_down.weight");
  const int64_t r = down.size(0);
  F::expect_rank(r, down, module, "lora_down.weight");
  auto with_kernel = [&](std::vector<int64_t> s, bool unit) {
    for (size_t i = 0; i < nk; ++i) s.push_back(unit ? 1 : layer.kernel[i]);
    return s;
  };
  if (mid.defined()) {
    if (!layer.is_conv())
      throw ShapeError(module + ".lora_mid.weight: Tucker factor on a non-conv layer " + layer.describe());
    F::expect_shape(down, with_kernel({r, I}, true), module, "lora_down.weight", "Tucker down for " + layer.describe());
    F::expect_shape(mid, with_kernel({r, r}, false), module, "lora_mid.weight", "rank " + std::to_string(r));
  } else {
    F::expect_shape(down, with_kernel({r, I}, false), module, "lora_down.weight", "for " + layer.describe());
  }
  // conv up: (O, r, 1, …) or the 2-D (O, r) DyLoRA writes (QUIRKS Q23)
  if (!(layer.is_conv() && up.sizes() == torch::IntArrayRef{O, r}))
    F::expect_shape(up, with_kernel({O, r}, true), module, "lora_up.weight",
                    "rank " + std::to_string(r) + " from lora_down.weight, " + layer.describe());
  LoRAFile f;
  f.weights.down = F::owned_float(down);
  f.weights.up = F::owned_float(up).reshape(with_kernel({O, r}, true));
  if (mid.defined()) f.weights.mid = F::owned_float(mid);
  f.alpha = read_alpha(t, module, r);
  if (auto ds = F::optional(t, "dora_scale"); ds.defined()) {
    F::dora::on_out(ds, layer.weight_shape(), module);
    f.dora_scale = F::owned_float(ds);
  }
  auto bi = F::optional(t, "bias_indices"), bv = F::optional(t, "bias_values"), bs = F::optional(t, "bias_size");
  if (bi.defined() || bv.defined() || bs.defined()) {
    const auto& i = F::require(t, "bias_indices", module);
    const auto& v = F::require(t, "bias_values", module);
    const auto& s = F::require(t, "bias_size", module);
    F::expect_shape(s, {2}, module, "bias_size");
    if (i.dim() != 2 || i.size(0) != 2 || v.dim() != 1 || v.size(0) != i.size(1))
      throw ShapeError(module + ".bias_indices/bias_values: expected (2, nnz) and (nnz,), got " +
                       F::shape_str(i.sizes()) + " and " + F::shape_str(v.sizes()));
    auto size = s.to(torch::kInt64);
    const int64_t rows = size[0].item<int64_t>(), cols = size[1].item<int64_t>();
    if (rows != O || cols != I * layer.kernel_numel())
      throw ShapeError(module + ".bias_size: expected [" + std::to_string(O) + ", " +
                       std::to_string(I * layer.kernel_numel()) + "], got [" + std::to_string(rows) + ", " +
                       std::to_string(cols) + "]");
    auto idx = i.to(torch::kInt64);
    if (idx.numel() > 0 && (idx.min().item<int64_t>() < 0 || idx[0].max().item<int64_t>() >= rows ||
                            idx[1].max().item<int64_t>() >= cols))
      throw ShapeError(module + ".bias_indices: index out of range for bias_size");
    f.bias_indices = i.clone();
    f.bias_values = v.clone();
    f.bias_size = s.clone();
  }
  return f;
}

// ---------------------------------------------------------------- the shared low-rank machinery

void LowRankAdapter::setup_common(const torch::TensorOptions& po, torch::Tensor loaded_dora_scale) {
  if (options_.use_scalar())
    scalar = register_parameter("scalar", torch::zeros({}, po));
  else
    scalar = register_buffer("scalar", torch::ones({}, po));
  if (loaded_dora_scale.defined()) {
    dora_scale = register_parameter("dora_scale", loaded_dora_scale);
  } else if (options_.dora()) {
    dora_scale = register_parameter("dora_scale",
                                    torch::ones(F::dora::scale_shape(layer_.weight_shape(), options_.wd_on_out()), po));
    dora_ready_ = false;
  }
}

void LowRankAdapter::begin_loaded(double alpha) {
  alpha_ = alpha;
  options_.use_scalar(false).rs_lora(false).dora(false);
}

void LowRankAdapter::record_loaded(int64_t rank, bool tucker) {
  options_.rank(rank).alpha(alpha_).tucker(tucker).dora(dora_scale.defined());
  if (dora_scale.defined()) options_.wd_on_out(F::dora::on_out(dora_scale, layer_.weight_shape(), algo_));
}

torch::Tensor LowRankAdapter::diff_weight() {
  auto dw = raw_diff();
  if (is_training() && options_.rank_dropout() > 0)
    dw = F::drop_rows(dw, options_.rank_dropout(), options_.rank_dropout_scale());
  return dw;
}

torch::Tensor LowRankAdapter::drop_out_channels(const torch::Tensor& delta) const {
  if (!is_training() || options_.rank_dropout() <= 0) return delta;
  auto mask = F::keep_mask(layer_.out_features, options_.rank_dropout(), options_.rank_dropout_scale(),
                           delta.options());
  std::vector<int64_t> shape(static_cast<size_t>(delta.dim()), 1);
  const int64_t axis = layer_.is_conv() ? delta.dim() - 1 - static_cast<int64_t>(layer_.kernel.size()) : delta.dim() - 1;
  shape[static_cast<size_t>(axis)] = layer_.out_features;
  return delta * mask.view(shape);
}

void LowRankAdapter::init_dora(const torch::Tensor& W) {
  torch::NoGradGuard no_grad;
  dora_scale.copy_(F::dora::init_scale(W, F::dora::on_out(dora_scale, layer_.weight_shape(), algo_)));
  dora_ready_ = true;
}

torch::Tensor LowRankAdapter::merged(const torch::Tensor& W, double m) {
  if (dora_scale.defined() && !dora_ready_) init_dora(W);
  return F::merge_delta(W, diff_weight(), m, dora_scale);
}

torch::Tensor LowRankAdapter::apply_weight(const torch::Tensor& W, double m) {
  if (F::module_dropped(options_.module_dropout(), is_training())) return W;
  return merged(W, m);
}

torch::Tensor LowRankAdapter::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                             double m) {
  if (F::module_dropped(options_.module_dropout(), is_training())) return layer_forward(x, layer_, W, b);
  // DoRA needs the norms of W + ΔW: materialise (bypass = rebuild, fixing QUIRKS Q7)
  if (dora_scale.defined()) return layer_forward(x, layer_, merged(W, m), b);
  auto delta = raw_bypass(x, m);
  if (!delta.defined()) delta = F::host_op(x, layer_, (diff_weight() * m).to(x.scalar_type()));
  if (is_training() && options_.dropout() > 0) delta = torch::dropout(delta, options_.dropout(), true);
  auto y = layer_forward(x, layer_, W, b);
  return y + delta.to(y.scalar_type());
}

// ---------------------------------------------------------------- LoRA

LoRAImpl::LoRAImpl(LayerSpec layer, AdapterOptions options) : LowRankAdapter("lora", std::move(layer), std::move(options)) {
  check_low_rank_options(layer_, options_, "lora");
  alpha_ = stored_alpha(options_);
  setup(F::lora::init_weights(layer_, options_.rank(), options_.tucker(), options_.use_scalar()), {});
}

LoRAImpl::LoRAImpl(LayerSpec layer, AdapterOptions options, F::lora::Weights w, double alpha,
                   torch::Tensor dora_scale_)
    : LowRankAdapter("lora", std::move(layer), std::move(options)) {
  begin_loaded(alpha);
  setup(std::move(w), std::move(dora_scale_));
  record_loaded(rank(), lora_mid.defined());
}

void LoRAImpl::setup(F::lora::Weights w, torch::Tensor ds) {
  lora_down = register_parameter("lora_down", w.down);
  lora_up = register_parameter("lora_up", w.up);
  if (w.mid.defined()) lora_mid = register_parameter("lora_mid", w.mid);
  setup_common(w.up.options(), std::move(ds));
}

void LoRAImpl::set_sparse_bias(torch::Tensor indices, torch::Tensor values, torch::Tensor size) {
  auto dense = torch::sparse_coo_tensor(indices.to(torch::kInt64), values.to(lora_up.scalar_type()),
                                        {size[0].item<int64_t>(), size[1].item<int64_t>()})
                   .to_dense();
  sparse_dense_ = register_buffer("sparse_bias", dense.reshape(layer_.weight_shape()).to(lora_up.device()));
  sparse_keys_ = {{"bias_indices", indices}, {"bias_values", values}, {"bias_size", size}};
}

F::lora::Weights LoRAImpl::weights() const { return {lora_down, lora_up * scalar, lora_mid}; }

torch::Tensor LoRAImpl::raw_diff() {
  auto dw = F::lora::diff_weight(layer_, weights(), scale());
  return sparse_dense_.defined() ? dw + sparse_dense_ : dw;
}

torch::Tensor LoRAImpl::raw_bypass(const torch::Tensor& x, double m) {
  // rank_dropout in bypass drops rank channels (TRAINING.md §4.1)
  torch::Tensor mask;
  if (is_training() && options_.rank_dropout() > 0)
    mask = F::keep_mask(rank(), options_.rank_dropout(), options_.rank_dropout_scale(), lora_up.options());
  auto delta = F::lora::bypass_diff(x, layer_, weights(), scale() * m, mask);
  if (sparse_dense_.defined()) delta = delta + F::host_op(x, layer_, (sparse_dense_ * m).to(x.scalar_type()));
  return delta;
}

NamedTensors LoRAImpl::file_tensors() const {
  NamedTensors out;
  if (dora_scale.defined()) out.emplace_back("dora_scale", dora_scale.detach());
  out.emplace_back("alpha", torch::scalar_tensor(alpha_, torch::kFloat32));
  out.emplace_back("lora_up.weight", (lora_up * scalar).detach());
  out.emplace_back("lora_down.weight", lora_down.detach());
  if (lora_mid.defined()) out.emplace_back("lora_mid.weight", lora_mid.detach());
  for (const auto& kv : sparse_keys_) out.push_back(kv);
  return out;
}

// ---------------------------------------------------------------- registry entry

Algorithm lora_algorithm() {
  Algorithm a;
  a.name = "lora";
  a.aliases = {"locon"};
  a.suffixes = {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha",
                "dora_scale",     "bias_indices",     "bias_values",     "bias_size"};
  a.detect = [](const TensorMap& t) { return t.count("lora_up.weight") > 0; };
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    auto f = read_lora_file(module, t, layer);
    auto m = std::make_shared<LoRAImpl>(layer, AdapterOptions().algo("lora"), f.weights, f.alpha, f.dora_scale);
    if (f.bias_indices.defined()) m->set_sparse_bias(f.bias_indices, f.bias_values, f.bias_size);
    return m;
  };
  a.create = create_adapter<LoRAImpl>;
  a.rank = [](const TensorMap& t) { return stored_size(t, {"lora_down.weight"}); };
  a.supports = supports_weight_layer;
  return a;
}

}  // namespace lycoris
