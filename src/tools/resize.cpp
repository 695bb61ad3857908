// `lycoris resize`: best rank-N LoRA modules (see include/lycoris/tools/resize.hpp).
#include "lycoris/tools/resize.hpp"

#include <torch/torch.h>

#include <chrono>
#include <cmath>

#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/file_layouts.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/svd.hpp"
#include "lycoris/io/output_path.hpp"
#include "lycoris/io/safetensors.hpp"
#include "tool_checks.hpp"

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

// x / 2^e in `compute` on `device`, with 2^e ≥ max|x| (1 for an all-zero x) in `scale`. Exact: a power of two
// changes only the exponent; scaled in x's own compute dtype, before any narrowing to `compute`.
torch::Tensor unit_scaled(const torch::Tensor& x, torch::ScalarType compute, const torch::Device& device,
                          double& scale) {
  auto y = x.to(device, F::compute_dtype(x), /*non_blocking=*/false, /*copy=*/true);
  const auto [lo, hi] = torch::aminmax(y);
  const double m = std::max(-lo.item<double>(), hi.item<double>());
  int e = 0;
  std::frexp(m, &e);
  scale = m > 0 ? std::ldexp(1.0, e) : 1.0;
  // in two halves, each a normal number of y's dtype (a subnormal factor may be flushed to zero)
  if (e != 0) y.mul_(std::ldexp(1.0, -e / 2)).mul_(std::ldexp(1.0, -e + e / 2));
  return y.to(compute);
}

// Every tensor a module's output holds must be finite: NaN/Inf input is refused, never resized or copied.
void require_finite_module(const std::string& module, const TensorMap& t) {
  for (const auto& [suffix, tensor] : t) require_finite(tensor, module, module + "." + suffix);
}

// What a resize can write back: finite values and floating-point factors (FormatError otherwise).
void check_resizable(const std::string& module, const TensorMap& t) {
  require_finite_module(module, t);
  for (const char* k : {"lora_up.weight", "lora_down.weight", "lora_mid.weight"})
    if (auto f = F::optional(t, k); f.defined() && !torch::isFloatingType(f.scalar_type()))
      throw FormatError(module + ": tensor '" + module + "." + k + "' has dtype " +
                        io::dtype_name(io::from_torch(f.scalar_type())) +
                        ": LoRA factors are floating point (F16, BF16, F32, F64)");
}

}  // namespace

NamedTensors resize_lora_module(const std::string& module, const TensorMap& t, const RankRule& rule,
                                ResizeModuleReport& report, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  check_resizable(module, t);
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
  report.old_rank = r;
  if (r == 0 || up_in.numel() == 0 || down_in.numel() == 0) {
    report.new_rank = r;
    report.note = "empty factors (ΔW = 0): copied unchanged";
    return NamedTensors(t.begin(), t.end());
  }
  const double s = adapter->alpha() / static_cast<double>(r);  // alpha() is r when the key is missing
  if (s == 0) {
    report.new_rank = r;
    report.note = "scale alpha/r is 0: copied unchanged";
    return NamedTensors(t.begin(), t.end());
  }

  // ΔW = s·up·D_eff = s·a·b·(A·B) with A = up/a, B = D_eff/b: the SVD runs on factors scaled to |x| ≤ 1, so
  // finite factors near the limit of their dtype cannot overflow in it; the scale comes back in fp64.
  const auto compute = F::compute_dtype(up_in);
  double a = 1, b = 1, b_mid = 1;
  auto A = F::flat(unit_scaled(up_in, compute, device, a));
  auto B = F::flat(unit_scaled(down_in, compute, device, b));  // (r, I·k)
  if (mid_in.defined()) {
    auto mid = unit_scaled(mid_in, compute, device, b_mid).flatten(2);  // (r, r, k)
    B = torch::einsum("ijk,jc->ick", {mid, B}).reshape({r, -1});
  }
  const double scale = std::abs(s) * a * b * b_mid;
  auto svd = F::svd_product(A, B);
  auto S = svd.S.to(torch::kFloat64) * scale;  // the singular values of ΔW
  int64_t n = select_rank(S, rule);
  n = std::max<int64_t>(1, std::min(n, svd.rank()));
  if (rule.mode == RankMode::Fixed && rule.param > static_cast<double>(svd.rank()))
    report.note = "rank " + std::to_string(static_cast<int64_t>(rule.param)) + " ≥ the module's rank " +
                  std::to_string(svd.rank()) + ": kept at " + std::to_string(n);
  report.new_rank = n;
  report.retained_energy = F::retained_energy(S, n);
  report.delta_energy = S.square().sum().item<double>();
  report.resized = true;
  auto kept = F::truncate(svd, n);

  // Every tensor is checked in the dtype the file will hold it in.
  const auto dtype = up_in.scalar_type();
  const std::string hint = "the resized factors do not fit the input's dtype";
  // alpha' = s·N in the stored alpha dtype; the factors absorb its rounding so ΔW' = U_N Σ_N V_Nᵀ exactly
  auto alpha_in = F::optional(t, "alpha");
  const auto alpha_dtype =
      alpha_in.defined() && torch::isFloatingType(alpha_in.scalar_type()) ? alpha_in.scalar_type() : torch::kFloat32;
  auto alpha = round_finite(torch::full({}, s * static_cast<double>(n), torch::kFloat64), alpha_dtype, module,
                            "alpha", "alpha/r × the new rank does not fit the dtype of alpha");
  if (alpha_in.defined() && alpha_in.dim() == 1) alpha = alpha.reshape({1});
  const double s_new = F::scalar_value(alpha, module, "alpha") / static_cast<double>(n);
  if (s_new == 0)
    throw Error(module + ": alpha: alpha/r × the new rank = " + std::to_string(s * static_cast<double>(n)) +
                " rounds to 0 in " + io::dtype_name(io::from_torch(alpha_dtype)));
  // s'·up'·down' = ΔW for up' = U·√(S_AB·k), down' = √(S_AB·k)·Vᵀ, k = |s|·a·b/|s'| (s, s' have the same sign);
  // in fp64, so that values beyond the output dtype reach round_finite as they are
  auto root = (kept.S.to(torch::kFloat64) * (scale / std::abs(s_new))).sqrt();
  auto new_up = kept.U.to(torch::kFloat64) * root.unsqueeze(0);
  auto new_down = kept.Vh.to(torch::kFloat64) * root.unsqueeze(1);
  std::vector<int64_t> up_shape{O, n}, down_shape{n, I};
  up_shape.resize(shape.size(), 1);
  down_shape.insert(down_shape.end(), kernel.begin(), kernel.end());

  F::lora::Weights resized;  // up checked first: the error names it when both overflow
  resized.up = round_finite(new_up.reshape(up_shape).cpu(), dtype, module, "lora_up.weight", hint).contiguous();
  resized.down = round_finite(new_down.reshape(down_shape).cpu(), dtype, module, "lora_down.weight", hint).contiguous();
  // LoRA's writer (dora_scale kept as it is), then the sparse-bias keys as they are
  auto out = lora_file_tensors(resized, alpha, F::optional(t, "dora_scale"));
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
  if (options.threads < 0) throw OptionError("--threads: must be ≥ 0");
  io::check_output_path(output);
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
    try {
      if (algo && algo->name == "lora") {
        out = resize_lora_module(module, mt, options.rule, mr, options.device);
      } else {
        mr.algo = algo ? algo->name : "unknown";
        mr.note = "copied unchanged (" + mr.algo + " modules are not resized)";
        require_finite_module(module, mt);
        out.assign(mt.begin(), mt.end());
      }
    } catch (...) {
      rethrow_with_context({file.path()}, module);
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
    if (name.find('.') == std::string::npos) {
      require_finite(file.tensor(name), file.path(), name);
      tensors.emplace_back(name, file.tensor(name));
    }
  report.retained_energy = total2 > 0 ? kept2 / total2 : 1.0;
  io::save_file(output, tensors, file.metadata());
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

}  // namespace lycoris::tools
