// `lycoris resize`: best rank-N LoRA modules (see include/lycoris/tools/resize.hpp).
#include "lycoris/tools/resize.hpp"

#include <torch/torch.h>

#include <chrono>
#include <cmath>

#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/svd.hpp"
#include "lycoris/io/safetensors.hpp"

namespace lycoris::tools {

namespace F = functional;

namespace {

// The weight shape (O, I, *K) a LoRA module's factors imply.
std::vector<int64_t> implied_shape(const std::string& module, const TensorMap& t) {
  const auto& up = F::require(t, "lora_up.weight", module);
  const auto& down = F::require(t, "lora_down.weight", module);
  auto mid = F::optional(t, "lora_mid.weight");
  if (up.dim() < 2 || down.dim() < 2)
    throw ShapeError(module + ": lora_up.weight " + F::shape_str(up.sizes()) + " / lora_down.weight " +
                     F::shape_str(down.sizes()) + " are not LoRA factors (need ≥ 2 dims)");
  std::vector<int64_t> shape{up.size(0), down.size(1)};
  const auto kernel = mid.defined() && mid.dim() > 2 ? mid.sizes().slice(2) : down.sizes().slice(2);
  shape.insert(shape.end(), kernel.begin(), kernel.end());
  return shape;
}

}  // namespace

NamedTensors resize_lora_module(const std::string& module, const TensorMap& t, const RankRule& rule,
                                ResizeModuleReport& report, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  const auto shape = implied_shape(module, t);
  // validates every key and shape the way any loader does (KeyError / ShapeError naming the module)
  auto adapter = load_adapter(module, t, LayerSpec::from_weight_shape(shape, false));
  report.module = module;
  report.algo = "lora";
  const auto& up_in = t.at("lora_up.weight");
  const auto& down_in = t.at("lora_down.weight");
  auto mid_in = F::optional(t, "lora_mid.weight");
  const int64_t r = down_in.size(0), O = shape[0], I = shape[1];
  const std::vector<int64_t> kernel(shape.begin() + 2, shape.end());
  const double s = adapter->alpha() / static_cast<double>(r);  // alpha() is r when the key is missing
  report.old_rank = r;

  auto up = F::flat(up_in.to(device, torch::kFloat32));
  auto down = down_in.to(device, torch::kFloat32);
  torch::Tensor d_eff;  // (r, I·k)
  if (mid_in.defined()) {
    auto mid = mid_in.to(device, torch::kFloat32).flatten(2);  // (r, r, k)
    d_eff = torch::einsum("ijk,jc->ick", {mid, F::flat(down)}).reshape({r, -1});
  } else {
    d_eff = F::flat(down);
  }
  if (s == 0 || !std::isfinite(s)) {
    report.new_rank = r;
    report.note = "scale alpha/r is " + std::to_string(s) + ": copied unchanged";
    return NamedTensors(t.begin(), t.end());
  }
  auto svd = F::svd_product(up * s, d_eff);
  int64_t n = select_rank(svd.S, rule);
  n = std::max<int64_t>(1, std::min(n, svd.rank()));
  if (rule.mode == RankMode::Fixed && rule.param > static_cast<double>(svd.rank()))
    report.note = "rank " + std::to_string(static_cast<int64_t>(rule.param)) + " ≥ the module's rank " +
                  std::to_string(svd.rank()) + ": kept at " + std::to_string(n);
  report.new_rank = n;
  report.retained_energy = F::retained_energy(svd.S, n);
  report.delta_energy = svd.S.to(torch::kFloat64).square().sum().item<double>();
  report.resized = true;
  auto kept = F::truncate(svd, n);

  // alpha' = s·N in the stored alpha dtype; the factors absorb its rounding so ΔW' = U_N Σ_N V_Nᵀ exactly
  auto alpha_in = F::optional(t, "alpha");
  const auto alpha_dtype =
      alpha_in.defined() && torch::isFloatingType(alpha_in.scalar_type()) ? alpha_in.scalar_type() : torch::kFloat32;
  auto alpha = torch::full({}, s * static_cast<double>(n), torch::TensorOptions().dtype(alpha_dtype));
  if (alpha_in.defined() && alpha_in.dim() == 1) alpha = alpha.reshape({1});
  const double s_new = F::scalar_value(alpha, module, "alpha") / static_cast<double>(n);
  auto root = (kept.S / std::abs(s_new)).sqrt();
  auto new_up = kept.U * root.unsqueeze(0) * (s_new < 0 ? -1.0 : 1.0);
  auto new_down = kept.Vh * root.unsqueeze(1);
  std::vector<int64_t> up_shape{O, n}, down_shape{n, I};
  up_shape.resize(shape.size(), 1);
  down_shape.insert(down_shape.end(), kernel.begin(), kernel.end());
  const auto dtype = up_in.scalar_type();

  NamedTensors out;
  if (auto ds = F::optional(t, "dora_scale"); ds.defined()) out.emplace_back("dora_scale", ds);
  out.emplace_back("alpha", alpha);
  out.emplace_back("lora_up.weight", new_up.reshape(up_shape).to(torch::kCPU, dtype).contiguous());
  out.emplace_back("lora_down.weight", new_down.reshape(down_shape).to(torch::kCPU, dtype).contiguous());
  for (const char* k : {"bias_indices", "bias_values", "bias_size"})
    if (auto v = F::optional(t, k); v.defined()) out.emplace_back(k, v);
  if (mid_in.defined())
    report.note += std::string(report.note.empty() ? "" : "; ") + "Tucker factors merged: written as plain LoCon";
  return out;
}

ResizeReport resize(const std::string& input, const std::string& output, const ResizeOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  if (options.rule.mode != RankMode::Fixed && options.rule.mode != RankMode::Ratio &&
      options.rule.mode != RankMode::Threshold)
    throw OptionError("resize: the rank rule must be --dim, --ratio or --threshold");
  validate(options.rule, options.rule.mode == RankMode::Fixed ? "--dim" : options.rule.mode == RankMode::Ratio
                                                                             ? "--ratio"
                                                                             : "--threshold");
  if (options.threads > 0) at::set_num_threads(options.threads);
  auto file = io::SafetensorsFile::open(input);
  ResizeReport report;
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  double kept2 = 0, total2 = 0;
  for (const auto& [module, mt] : group_modules(file)) {
    const auto* algo = detect_algorithm(mt);
    ResizeModuleReport mr;
    mr.module = module;
    NamedTensors out;
    if (algo && algo->name == "lora") {
      out = resize_lora_module(module, mt, options.rule, mr, options.device);
    } else {
      mr.algo = algo ? algo->name : "unknown";
      mr.note = "copied unchanged (" + mr.algo + " modules are not resized)";
      out.assign(mt.begin(), mt.end());
    }
    if (mr.resized) {
      ++report.resized;
      kept2 += mr.retained_energy * mr.delta_energy;
      total2 += mr.delta_energy;
    } else {
      ++report.copied;
    }
    for (auto& [suffix, tensor] : out) tensors.emplace_back(module + "." + suffix, tensor);
    report.modules.push_back(std::move(mr));
  }
  // keys outside any module (no '.') are kept as they are
  for (const auto& name : file.names())
    if (name.find('.') == std::string::npos) tensors.emplace_back(name, file.tensor(name));
  report.retained_energy = total2 > 0 ? kept2 / total2 : 1.0;
  io::save_file(output, tensors, file.metadata());
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

}  // namespace lycoris::tools
