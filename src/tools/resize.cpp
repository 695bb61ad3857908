// `lycoris resize`: best rank-N LoRA modules (see include/lycoris/tools/resize.hpp).
#include "lycoris/tools/resize.hpp"

#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <map>
#include <utility>

#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/file_layouts.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/svd.hpp"
#include "lycoris/io/output_path.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/tools/budget.hpp"
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

// The exact spectrum of a LoRA module's ΔW (docs/tools.md#resize), or why the module is copied unchanged.
struct ModuleSpectrum {
  std::vector<int64_t> shape;  // the weight shape (O, I, *K)
  int64_t rank = 0;            // the stored rank r
  double s = 0, scale = 0;     // alpha/r; the factor that turns svd.S into the singular values of ΔW
  F::SVD svd;                  // of the scaled factors
  torch::Tensor S;             // the singular values of ΔW (fp64)
  std::string copy_note;       // non-empty: copied unchanged, with this reason
};

ModuleSpectrum module_spectrum(const std::string& module, const TensorMap& t, const torch::Device& device) {
  check_resizable(module, t);
  ModuleSpectrum m;
  m.shape = implied_shape(module, t);
  // validates every key and shape the way any loader does (KeyError / ShapeError naming the module)
  auto adapter = load_adapter(module, t, LayerSpec::from_weight_shape(m.shape, false));
  const auto& up_in = t.at("lora_up.weight");
  const auto& down_in = t.at("lora_down.weight");
  auto mid_in = F::optional(t, "lora_mid.weight");
  const int64_t r = down_in.size(0);
  m.rank = r;
  if (r == 0 || up_in.numel() == 0 || down_in.numel() == 0) {
    m.copy_note = "empty factors (ΔW = 0): copied unchanged";
    return m;
  }
  m.s = adapter->alpha() / static_cast<double>(r);  // alpha() is r when the key is missing
  if (m.s == 0) {
    m.copy_note = "scale alpha/r is 0: copied unchanged";
    return m;
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
  m.scale = std::abs(m.s) * a * b * b_mid;
  m.svd = F::svd_product(A, B);
  m.S = m.svd.S.to(torch::kFloat64) * m.scale;  // the singular values of ΔW
  return m;
}

// alpha' as the output stores it: the input alpha's floating dtype (fp32 if none or an integer one) and shape.
torch::Tensor alpha_like(const TensorMap& t, const torch::Tensor& value) {
  auto alpha_in = F::optional(t, "alpha");
  auto alpha = value;
  if (alpha_in.defined() && alpha_in.dim() == 1) alpha = alpha.reshape({1});
  return alpha;
}
torch::ScalarType alpha_dtype(const TensorMap& t) {
  auto alpha_in = F::optional(t, "alpha");
  return alpha_in.defined() && torch::isFloatingType(alpha_in.scalar_type()) ? alpha_in.scalar_type()
                                                                              : torch::kFloat32;
}

// The resized factors' shapes for a weight of `shape` at rank n: up (O, n, 1, …), down (n, I, *K).
std::pair<std::vector<int64_t>, std::vector<int64_t>> factor_shapes(const std::vector<int64_t>& shape, int64_t n) {
  std::vector<int64_t> up{shape[0], n}, down{n, shape[1]};
  up.resize(shape.size(), 1);
  down.insert(down.end(), shape.begin() + 2, shape.end());
  return {up, down};
}

// The module's output: LoRA's writer (dora_scale kept as it is), then the sparse-bias keys as they are.
NamedTensors resized_tensors(const F::lora::Weights& w, const torch::Tensor& alpha, const TensorMap& t) {
  auto out = lora_file_tensors(w, alpha, F::optional(t, "dora_scale"));
  for (const char* k : {"bias_indices", "bias_values", "bias_size"})
    if (auto v = F::optional(t, k); v.defined()) out.emplace_back(k, v);
  return out;
}

}  // namespace

NamedTensors resize_lora_module(const std::string& module, const TensorMap& t, const RankRule& rule,
                                ResizeModuleReport& report, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  auto m = module_spectrum(module, t, device);
  report.module = module;
  report.algo = "lora";
  report.old_rank = m.rank;
  if (!m.copy_note.empty()) {
    report.new_rank = m.rank;
    report.note = m.copy_note;
    return NamedTensors(t.begin(), t.end());
  }
  const auto& up_in = t.at("lora_up.weight");
  auto mid_in = F::optional(t, "lora_mid.weight");
  const auto& shape = m.shape;
  const auto& svd = m.svd;
  const auto& S = m.S;
  const double s = m.s, scale = m.scale;
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
  const auto a_dtype = alpha_dtype(t);
  auto alpha = alpha_like(t, round_finite(torch::full({}, s * static_cast<double>(n), torch::kFloat64), a_dtype,
                                          module, "alpha", "alpha/r × the new rank does not fit the dtype of alpha"));
  const double s_new = F::scalar_value(alpha, module, "alpha") / static_cast<double>(n);
  if (s_new == 0)
    throw Error(module + ": alpha: alpha/r × the new rank = " + std::to_string(s * static_cast<double>(n)) +
                " rounds to 0 in " + io::dtype_name(io::from_torch(a_dtype)));
  // s'·up'·down' = ΔW for up' = U·√(S_AB·k), down' = √(S_AB·k)·Vᵀ, k = |s|·a·b/|s'| (s, s' have the same sign);
  // in fp64, so that values beyond the output dtype reach round_finite as they are
  auto root = (kept.S.to(torch::kFloat64) * (scale / std::abs(s_new))).sqrt();
  auto new_up = kept.U.to(torch::kFloat64) * root.unsqueeze(0);
  auto new_down = kept.Vh.to(torch::kFloat64) * root.unsqueeze(1);
  const auto [up_shape, down_shape] = factor_shapes(shape, n);

  F::lora::Weights resized;  // up checked first: the error names it when both overflow
  resized.up = round_finite(new_up.reshape(up_shape).cpu(), dtype, module, "lora_up.weight", hint).contiguous();
  resized.down = round_finite(new_down.reshape(down_shape).cpu(), dtype, module, "lora_down.weight", hint).contiguous();
  auto out = resized_tensors(resized, alpha, t);
  if (mid_in.defined())
    report.note += std::string(report.note.empty() ? "" : "; ") + "Tucker factors merged: written as plain LoCon";
  return out;
}

namespace {

// A tensor's bytes in the file plus the header bound of its entry (docs/tools.md#budget).
uint64_t entry_cost(const std::string& output, const std::string& key, const torch::Tensor& t, uint64_t budget) {
  const auto n = static_cast<uint64_t>(t.numel()) * static_cast<uint64_t>(t.element_size());
  return n + io::header_entry_bound(output, {key, io::from_torch(t.scalar_type()), t.sizes().vec()}, budget);
}

// Budget mode: the new rank of every module (0: dropped; -1: not a resized LoRA module, copied as it is), from
// one allocation over all LoRA modules of what the copied tensors and the file's fixed part leave.
struct PlannedRank {
  int64_t rank = -1;
  double energy = 0;  // ‖ΔW‖² of a LoRA module
};

std::vector<io::TensorDecl> decls_of(const std::string& prefix, const NamedTensors& tensors) {
  std::vector<io::TensorDecl> out;
  for (const auto& [suffix, t] : tensors)
    out.push_back({prefix + suffix, io::from_torch(t.scalar_type()), t.sizes().vec()});
  return out;
}

std::map<std::string, PlannedRank> plan_ranks(const io::SafetensorsFile& file,
                                          const std::map<std::string, TensorMap>& modules, const std::string& output,
                                          const ResizeOptions& o) {
  const uint64_t B = o.budget_bytes;
  // the output in write order: per module its tensors, as they are (copied) or per rank (layouts[n - 1])
  struct Part {
    std::vector<io::TensorDecl> copied;
    std::vector<std::vector<io::TensorDecl>> layouts;
    size_t choice_index = 0;
  };
  std::vector<Part> parts;
  uint64_t fixed = io::safetensors_size(output, {}, file.metadata()) + 7;  // length, metadata, padding
  std::map<std::string, PlannedRank> ranks;
  std::vector<std::vector<BudgetChoice>> choices;
  std::vector<std::string> names;
  for (const auto& [module, mt] : modules) {
    ranks[module] = {};
    const auto* algo = detect_algorithm(mt);
    ModuleSpectrum m;
    try {
      if (algo && algo->name == "lora") m = module_spectrum(module, mt, o.device);
    } catch (...) {
      rethrow_with_context({file.path()}, module);
    }
    Part part;
    if (!algo || algo->name != "lora" || !m.copy_note.empty()) {
      for (const auto& [suffix, t] : mt) fixed += entry_cost(output, module + "." + suffix, t, B);
      part.copied = decls_of(module + ".", NamedTensors(mt.begin(), mt.end()));
      parts.push_back(std::move(part));
      continue;
    }
    // rank n: error Σ_{i>n} σ_i², cost the tensors the resized module writes (as empty meta tensors)
    auto S2 = m.S.square().cpu().contiguous();
    const auto* s2 = S2.data_ptr<double>();
    std::vector<double> tail(static_cast<size_t>(S2.size(0)) + 1, 0.0);
    for (size_t i = tail.size() - 1; i-- > 0;) tail[i] = tail[i + 1] + s2[i];
    std::vector<BudgetChoice> c{{0, tail[0]}};
    const auto meta = torch::TensorOptions().device(torch::kMeta);
    const auto dtype = mt.at("lora_up.weight").scalar_type();
    const auto alpha = alpha_like(mt, torch::empty({}, meta.dtype(alpha_dtype(mt))));
    for (int64_t n = 1; n <= m.svd.rank(); ++n) {
      const auto [up, down] = factor_shapes(m.shape, n);
      F::lora::Weights w{torch::empty(down, meta.dtype(dtype)), torch::empty(up, meta.dtype(dtype)), {}};
      const auto layout = resized_tensors(w, alpha, mt);
      uint64_t cost = 0;
      for (const auto& [suffix, t] : layout) cost += entry_cost(output, module + "." + suffix, t, B);
      c.push_back({cost, tail[std::min<size_t>(static_cast<size_t>(n), tail.size() - 1)]});
      part.layouts.push_back(decls_of(module + ".", layout));
    }
    part.choice_index = choices.size();
    parts.push_back(std::move(part));
    choices.push_back(std::move(c));
    names.push_back(module);
    ranks[module].energy = tail[0];
  }
  std::vector<io::TensorDecl> loose;  // keys outside any module, written last
  for (const auto& name : file.names())
    if (name.find('.') == std::string::npos) {
      fixed += entry_cost(output, name, file.tensor(name), B);
      loose.push_back({name, file.info(name).dtype, file.info(name).shape});
    }
  if (fixed > B)
    throw OptionError("--budget: " + std::to_string(B) + " bytes cannot hold even the header and the modules copied "
                      "as they are (" + std::to_string(fixed) + " bytes)");
  auto exact_size = [&](const BudgetAllocation& a) {
    std::vector<io::TensorDecl> decls;
    for (const auto& p : parts) {
      const size_t k = p.layouts.empty() ? 0 : a.choice[p.choice_index];
      const auto& d = p.layouts.empty() ? p.copied : k > 0 ? p.layouts[k - 1] : std::vector<io::TensorDecl>{};
      decls.insert(decls.end(), d.begin(), d.end());
    }
    decls.insert(decls.end(), loose.begin(), loose.end());
    return io::safetensors_size(output, decls, file.metadata());
  };
  const auto a = allocate_exact(choices, B - fixed, B, exact_size, "--budget");
  bool any = names.empty();
  for (size_t j = 0; j < names.size(); ++j) {
    ranks[names[j]].rank = static_cast<int64_t>(a.choice[j]);  // choice k is rank k (0: dropped)
    any = any || a.choice[j] > 0;
  }
  if (!any)
    throw OptionError("--budget: " + std::to_string(B) + " bytes is too small for even one module at rank 1");
  return ranks;
}

}  // namespace

ResizeReport resize(const std::string& input, const std::string& output, const ResizeOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  if (options.rule.mode != RankMode::Fixed && options.rule.mode != RankMode::Ratio &&
      options.rule.mode != RankMode::Threshold)
    throw OptionError("resize: the rank rule must be --dim, --ratio or --threshold");
  const bool budget = options.budget_bytes > 0;
  if (!budget)
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
  const auto modules = group_modules(file);
  std::map<std::string, PlannedRank> ranks;
  if (budget) ranks = plan_ranks(file, modules, output, options);
  for (const auto& [module, mt] : modules) {
    const auto* algo = detect_algorithm(mt);
    ResizeModuleReport mr;
    mr.module = module;
    NamedTensors out;
    try {
      const int64_t planned = budget ? ranks.at(module).rank : -1;
      if (planned == 0) {
        mr.algo = "lora";
        mr.old_rank = mt.at("lora_down.weight").size(0);
        mr.new_rank = 0;
        mr.retained_energy = 0;
        mr.delta_energy = ranks.at(module).energy;
        mr.dropped = true;
        mr.note = "dropped: rank 0 under the budget";
        total2 += mr.delta_energy;
        ++report.dropped;
        report.modules.push_back(std::move(mr));
        continue;
      }
      if (algo && algo->name == "lora") {
        const RankRule rule = planned > 0 ? RankRule{RankMode::Fixed, static_cast<double>(planned)} : options.rule;
        out = resize_lora_module(module, mt, rule, mr, options.device);
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
    for (auto& [suffix, tensor] : out) {
      tensors.emplace_back(module + "." + suffix, tensor);
      mr.bytes += static_cast<uint64_t>(tensor.numel()) * static_cast<uint64_t>(tensor.element_size());
    }
    report.modules.push_back(std::move(mr));
  }
  // keys outside any module (no '.') are kept as they are
  for (const auto& name : file.names())
    if (name.find('.') == std::string::npos) {
      require_finite(file.tensor(name), file.path(), name);
      tensors.emplace_back(name, file.tensor(name));
    }
  report.retained_energy = total2 > 0 ? kept2 / total2 : 1.0;
  std::vector<io::TensorDecl> decls;
  for (const auto& [key, t] : tensors) decls.push_back({key, io::from_torch(t.scalar_type()), t.sizes().vec()});
  report.file_bytes = io::safetensors_size(output, decls, file.metadata());
  if (budget && report.file_bytes > options.budget_bytes)
    throw Error("budget: the output would take " + std::to_string(report.file_bytes) +
                " bytes, beyond the budget (please report this)");
  io::save_file(output, tensors, file.metadata());
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

}  // namespace lycoris::tools
