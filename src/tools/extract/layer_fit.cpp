// Extract's per-layer rule and the layer fits in the file's layout (see include/lycoris/tools/extract.hpp): the
// fitters (fitters.hpp) give an algorithm's factors, its module's writer names them (docs/format.md#key-order).
#include <c10/util/accumulate.h>
#include <torch/torch.h>

#include <string>
#include <utility>

#include "lycoris/algorithms.hpp"
#include "lycoris/file_layouts.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/svd.hpp"
#include "lycoris/tools/extract.hpp"
#include "tools/extract/fitters.hpp"

namespace lycoris::tools {

namespace F = functional;

LayerFit fit_locon(const torch::Tensor& D, int64_t rank, const ExtractOptions& o) {
  auto f = fit_locon_factors(D, rank, o);
  LayerFit fit;
  fit.tensors = lora_file_tensors(f.weights, f.alpha);
  // the residual entries after the factors (docs/format.md#sparse-bias), in the order LoRA's writer keeps them
  if (f.bias_indices.defined())
    fit.tensors.insert(fit.tensors.end(),
                       {{"bias_indices", f.bias_indices}, {"bias_values", f.bias_values}, {"bias_size", f.bias_size}});
  fit.form = f.weights.mid.defined() ? "lora+tucker" : "lora";
  fit.rank = rank;
  fit.note = std::move(f.note);
  return fit;
}

LayerFit fit_loha(const torch::Tensor& D, int64_t rank, const ExtractOptions& o) {
  auto f = fit_loha_factors(D, rank, o);
  LayerFit fit;
  fit.tensors = loha_file_tensors(f.weights, f.alpha);
  fit.form = "loha";
  fit.rank = rank;
  return fit;
}

LayerFit fit_lokr(const torch::Tensor& D, int64_t rank, const ExtractOptions& o) {
  auto f = fit_lokr_factors(D, rank, o);
  LayerFit fit;
  fit.tensors = lokr_file_tensors(f.weights, f.alpha);
  fit.form = f.weights.w2.defined() ? "lokr(full w2)" : "lokr";
  fit.rank = rank;
  return fit;
}

namespace {

// The layer stored whole (docs/tools.md#extract-locon): `diff`, and `diff_b` for a bias change.
LayerFit full_difference(const torch::Tensor& D, const torch::Tensor& bias_delta, std::string note) {
  LayerFit fit;
  fit.form = "diff";
  fit.note = std::move(note);
  fit.tensors = {{"diff", D}};
  if (bias_delta.defined()) fit.tensors.emplace_back("diff_b", F::to_compute(bias_delta, D));
  return fit;
}

// The raw rank of the rule for LoKr: on the singular values of the unconstrained W2 (p, q·k)
// (docs/tools.md#extract-rank-modes).
int64_t lokr_raw_rank(const torch::Tensor& D, const KronSplit& s, const RankRule& rule, const ExtractOptions& o) {
  if (o.mode == RankMode::Fixed) return select_rank({}, rule);
  auto w2 = nearest_kronecker(kron_rearrange(D, s), o).second;
  return select_rank(F::singular_values(w2.reshape({s.p, s.q * c10::multiply_integers(D.sizes().slice(2))})), rule);
}

}  // namespace

LayerFit extract_layer(const torch::Tensor& D_, const torch::Tensor& bias_delta, const ExtractOptions& o) {
  check_fit_input(D_, "extract");
  auto D = F::to_compute(D_, D_);
  const int64_t O = D.size(0), I = D.size(1);
  const bool linear_like = c10::multiply_integers(D.sizes().slice(2)) == 1;
  const RankRule rule{o.mode, linear_like ? o.linear_param : o.conv_param};
  if (o.mode == RankMode::Full) return full_difference(D, bias_delta, "");
  LayerFit fit;
  int64_t raw = 0, r = 0;
  if (o.algo == ExtractAlgo::LoKr) {
    const auto s = kron_split(D, o.lokr_factor);
    raw = lokr_raw_rank(D, s, rule, o);
    r = clamp_rank(raw, s.p, s.q);
    fit = fit_lokr(D, r, o);
  } else {
    raw = o.mode == RankMode::Fixed ? select_rank({}, rule) : select_rank(F::singular_values_gram(F::flat(D)), rule);
    r = clamp_rank(raw, O, I);
    // LoCon: a rank of at least half the outputs is stored as the full difference (reference rule)
    if (o.algo == ExtractAlgo::LoCon && static_cast<double>(r) >= static_cast<double>(O) / 2.0)
      return full_difference(D, bias_delta, "rank " + std::to_string(r) + " ≥ out/2: full difference");
    fit = o.algo == ExtractAlgo::LoCon ? fit_locon(D, r, o) : fit_loha(D, r, o);
  }
  std::string clamp_note;
  if (o.mode == RankMode::Fixed && r < raw) clamp_note = "rank clamped to " + std::to_string(r);
  if (bias_delta.defined() && bias_delta.abs().max().item<double>() > 0)
    clamp_note += (clamp_note.empty() ? "" : "; ") + std::string("bias change dropped (low-rank layer)");
  if (!clamp_note.empty()) fit.note = clamp_note + (fit.note.empty() ? "" : "; " + fit.note);
  return fit;
}

torch::Tensor fit_delta(const LayerFit& fit, torch::IntArrayRef weight_shape) {
  if (fit.form == "diff" || fit.form == "norm") return F::to_compute(fit.tensors.front().second, fit.tensors.front().second);
  TensorMap map(fit.tensors.begin(), fit.tensors.end());
  auto like = map.at("alpha");
  auto spec = LayerSpec::from_weight_shape(weight_shape.vec(), false);
  auto adapter = load_adapter("extract", map, spec);
  auto zero = torch::zeros(weight_shape, like.options().dtype(torch::kFloat32));
  return adapter->apply_weight(zero, 1.0);
}

}  // namespace lycoris::tools
