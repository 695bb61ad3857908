#include "lycoris/modules/low_rank.hpp"

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "lycoris/functional/common.hpp"
#include "lycoris/functional/dora.hpp"
#include "modules/common.hpp"

namespace lycoris {

namespace F = functional;

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

// The kernels pass m·scale to torch as a scalar of the compute dtype: one that float32 cannot hold takes the
// generic path (ΔW overflows to Inf, reported as NaN/Inf) instead of torch refusing the scalar.
bool LowRankAdapter::kernel_scalar_fits(double m, caffe2::TypeMeta dtype) const {
  const double c = m * scale();
  return !(std::isfinite(c) && dtype == torch::kFloat32 && std::abs(c) > std::numeric_limits<float>::max());
}

torch::Tensor LowRankAdapter::merged(const torch::Tensor& W, double m) {
  if (dora_scale.defined() && !dora_ready_) init_dora(W);
  // W' = W + m·ΔW in one fused pass where the subclass's merge kernel is differentiable (LoRA: one addmm).
  // The generic form writes ΔW, then s·ΔW, m·ΔW and W + m·ΔW, and backward scales dW' twice: four
  // weight-sized passes per layer and step that this skips. The same arithmetic as merge, bit for bit.
  if (!dora_scale.defined() && delta_kernel_differentiable() && W.dim() >= 2 &&
      F::compute_dtype(W) == W.scalar_type() && kernel_scalar_fits(m, W.dtype()) &&
      !(is_training() && options_.rank_dropout() > 0)) {
    if (auto kernel = delta_kernel(m, W.options(), W.sizes())) {
      auto out = F::flat(W).clone();
      kernel->add(out, 0, out.size(0));
      return out.view(W.sizes());
    }
  }
  return F::merge_delta(W, diff_weight(), m, dora_scale);
}

torch::Tensor LowRankAdapter::apply_weight(const torch::Tensor& W, double m) {
  if (F::module_dropped(options_.module_dropout(), is_training())) return W;
  return merged(W, m);
}

torch::Tensor LowRankAdapter::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                             double m) {
  if (F::module_dropped(options_.module_dropout(), is_training())) return layer_forward(x, layer_, W, b);
  // DoRA needs the norms of W + ΔW: materialise (bypass = rebuild, docs/loaders.md#q7-dora-ignored-in-bypass)
  if (dora_scale.defined()) return layer_forward(x, layer_, merged(W, m), b);
  auto delta = raw_bypass(x, m);
  if (!delta.defined()) delta = F::host_op(x, layer_, (diff_weight() * m).to(x.scalar_type()));
  if (is_training() && options_.dropout() > 0) delta = torch::dropout(delta, options_.dropout(), true);
  auto y = layer_forward(x, layer_, W, b);
  return y + delta.to(y.scalar_type());
}

// W ← (W + ΔW) ⊙ g' with ΔW at multiplier 1 (docs/format.md#dora), the axis from dora_scale's shape: per
// output row within the rows of a chunk; per input column from the caller's column sums of V² over every row.
std::unique_ptr<RowKernel> LowRankAdapter::row_kernel(double m, const torch::TensorOptions& opts,
                                                      torch::IntArrayRef shape) const {
  if (is_training() || shape.size() < 2 || !dora_ready_) return nullptr;
  if (!kernel_scalar_fits(m, opts.dtype())) return nullptr;
  if (!dora_scale.defined()) return delta_kernel(m, opts, shape);
  auto k = delta_kernel(1.0, opts, shape);
  if (!k) return nullptr;
  const auto ds = dora_scale.detach().to(opts).reshape({-1});
  const RowKernel::RowsFn delta = k->add;
  if (F::dora::on_out(dora_scale, shape, algo_)) {
    const auto ds_rows = ds.view({-1, 1});
    k->add = [=](const torch::Tensor& Wr, int64_t r0, int64_t r1) {
      delta(Wr, r0, r1);
      Wr.mul_(F::dora::factor(ds_rows.narrow(0, r0, r1 - r0), F::dora::norm(Wr, true), m));
    };
    return k;
  }
  const int64_t I = shape[1], K = c10::multiply_integers(shape) / (shape[0] * I);
  const double eps = F::dora::epsilon(c10::typeMetaToScalarType(opts.dtype()));
  auto g = std::make_shared<torch::Tensor>();  // g' per input column, (1, I, 1), once the sums are known
  k->set_column_sums = [=](const torch::Tensor& sums) {
    auto n = sums.view({I, K}).sum(1).sqrt().to(opts.dtype()) + eps;  // ‖V[:, i, …]‖ + ε
    *g = F::dora::factor(ds, n, m).view({1, I, 1});
  };
  k->scale = [=](const torch::Tensor& Wr, int64_t, int64_t) { Wr.view({Wr.size(0), I, K}).mul_(*g); };
  return k;
}

torch::Tensor LowRankAdapter::additive_delta() {
  if (is_training() || dora_scale.defined()) return {};
  return diff_weight();
}

bool LowRankAdapter::in_compute(const torch::TensorOptions& compute, std::initializer_list<torch::Tensor> factors) {
  for (const auto& t : factors)
    if (t.defined() && (t.dtype() != compute.dtype() || t.device() != compute.device())) return false;
  return true;
}

// ---------------------------------------------------------------- registry pieces

const std::vector<std::string>& low_rank_options() {
  static const std::vector<std::string> o = {"tucker",  "use_scalar", "dora",        "rs_lora",
                                             "dropout", "rank_dropout", "rank_dropout_scale"};
  return o;
}

const std::vector<std::string>& lokr_options() {
  static const std::vector<std::string> o = [] {
    auto v = low_rank_options();
    v.insert(v.end(), {"factor", "decompose_both", "full_matrix", "unbalanced_factorization"});
    return v;
  }();
  return o;
}

bool dora_on_input_axis(const TensorMap& t) {
  auto it = t.find("dora_scale");
  return it != t.end() && it->second.dim() >= 2 && it->second.size(0) == 1 && it->second.size(1) > 1;
}

Traits low_rank_traits(const std::string& module, const TensorMap& t, int64_t rank) {
  Traits out;
  if (t.count("dora_scale")) out.push_back("dora");
  if (dora_on_input_axis(t)) out.push_back("dora-in");
  else if (t.count("dora_scale")) out.push_back("dora-out");
  add_alpha_traits(out, rank, alpha_or_nan(module, t));
  if (t.count("bias_indices") || t.count("bias_values")) out.push_back("sparse-bias");
  return out;
}

PeftForm low_rank_peft_form(const std::string& algo, const TensorMap& t, double scale, const std::string& fold_key) {
  PeftForm f;
  if (t.count("dora_scale") && algo != "lora") {
    f.refusal = algo + " with DoRA: PEFT has DoRA for LoRA only";
    return f;
  }
  if (dora_on_input_axis(t)) {
    f.refusal = "DoRA on the input axis: PEFT normalises per output row";
    return f;
  }
  for (const auto& [suffix, x] : t)
    if (suffix != "alpha") f.tensors.emplace_back(suffix, suffix == fold_key && scale != 1.0 ? folded(x, scale) : x);
  return f;
}

void low_rank_from_peft(TensorMap& t, double scale, int64_t rank, const std::string& fold_key) {
  if (t.count("alpha")) return;  // the file's own
  if (rank > 0)
    t["alpha"] = torch::tensor(static_cast<float>(scale * static_cast<double>(rank)));
  else if (scale != 1.0 && t.count(fold_key))
    t[fold_key] = folded(t.at(fold_key), scale);
}

}  // namespace lycoris
