// `lycoris extract`: the checkpoint-level tool — layers streamed from the two checkpoints, fitted by the
// per-layer rule (layer_fit.cpp, fitters.cpp) and written atomically (see include/lycoris/tools/extract.hpp).
#include "lycoris/tools/extract.hpp"

#include <c10/util/accumulate.h>
#include <torch/torch.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "exec/stopwatch.hpp"
#include "exec/threads.hpp"
#include "exec/worker_pool.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/io/output_path.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"
#include "lycoris/tools/budget.hpp"
#include "tools/extract/budget_plan.hpp"
#include "tools/tool_checks.hpp"
#include "lycoris/text.hpp"

namespace lycoris::tools {

namespace F = functional;

// ---------------------------------------------------------------- options and names

namespace {
constexpr EnumName<ExtractAlgo> kExtractAlgos[] = {{ExtractAlgo::LoCon, "locon"},
                                                   {ExtractAlgo::LoCon, "lora"},
                                                   {ExtractAlgo::LoHa, "loha"},
                                                   {ExtractAlgo::LoKr, "lokr"},
                                                   {ExtractAlgo::Auto, "auto"}};
constexpr EnumName<BudgetWeight> kBudgetWeights[] = {{BudgetWeight::None, "none"},
                                                     {BudgetWeight::BaseNorm, "base-norm"}};
}  // namespace

ExtractAlgo parse_extract_algo(const std::string& name) {
  ExtractAlgo a;
  std::string known;
  if (!parse_enum(kExtractAlgos, name, a, &known))
    throw OptionError("--algo: '" + escape_control(name) + "' is not one of " + known);
  return a;
}

const char* to_string(ExtractAlgo algo) { return enum_name(kExtractAlgos, algo); }

BudgetWeight parse_budget_weight(const std::string& name) {
  BudgetWeight w;
  std::string known;
  if (!parse_enum(kBudgetWeights, name, w, &known))
    throw OptionError("--budget-weight: '" + escape_control(name) + "' is not one of " + known);
  return w;
}

const char* to_string(BudgetWeight weight) { return enum_name(kBudgetWeights, weight); }

std::string extract_module_name(const std::string& prefix, const std::string& path) {
  if (prefix == "kohya")
    return naming::module_name(path.rfind("text_model.", 0) == 0 ? "lora_te" : "lora_unet", path);
  return naming::module_name(prefix, path);
}

// ---------------------------------------------------------------- the checkpoint-level tool

namespace {

void check_options(const ExtractOptions& o) {
  if (o.mode != RankMode::Full) {
    validate(RankRule{o.mode, o.linear_param}, "linear " + std::string(to_string(o.mode)));
    validate(RankRule{o.mode, o.conv_param}, "conv " + std::string(to_string(o.mode)));
  }
  if (o.sparse_bias && o.algo != ExtractAlgo::LoCon)
    throw OptionError("--use-sparse-bias: only LoCon files can carry a sparse bias (docs/format.md#sparse-bias)");
  if (std::isnan(o.sparsity) || o.sparsity < 0 || o.sparsity > 1)
    throw OptionError("--sparsity: " + std::to_string(o.sparsity) + " is outside [0, 1]");
  if (!torch::isFloatingType(o.dtype)) throw OptionError("extract: the output dtype must be a floating-point type");
  if (o.loha_iters < 0) throw OptionError("--loha-iters: must be ≥ 0");
  if (!(o.loha_tol >= 0)) throw OptionError("--loha-tol: must be ≥ 0");
  if (o.prefix.empty()) throw OptionError("--prefix: must not be empty");
  if (o.threads < 0) throw OptionError("--threads: must be ≥ 0");
  const bool budget = o.budget_bytes > 0 || o.budget_params > 0;
  if (o.budget_bytes > 0 && o.budget_params > 0)
    throw OptionError("--budget and --budget-params: give one of them");
  if (o.algo == ExtractAlgo::Auto && !budget)
    throw OptionError("--algo auto: chooses the algorithm per layer under a budget: give --budget or --budget-params");
  if (budget && (o.tucker || o.sparse_bias))
    throw OptionError(std::string(o.tucker ? "--tucker" : "--use-sparse-bias") +
                      ": not available with a budget (docs/tools.md#budget)");
}

// Every weight key (and the bias of each) must be in both checkpoints.
void check_same_keys(const io::SafetensorsFile& base, const io::SafetensorsFile& tuned) {
  std::vector<std::string> missing;
  auto scan = [&](const io::SafetensorsFile& a, const io::SafetensorsFile& b, const char* where) {
    for (const auto& layer : naming::base_layers(a.names())) {
      for (const auto* key : {&layer.weight_key, &layer.bias_key})
        if (!key->empty() && !b.contains(*key)) missing.push_back("'" + *key + "' only in " + where);
    }
  };
  scan(base, tuned, base.path().c_str());
  scan(tuned, base, tuned.path().c_str());
  if (missing.empty()) return;
  std::string msg = "extract: the checkpoints do not have the same layers: ";
  for (size_t i = 0; i < missing.size() && i < 5; ++i) msg += (i ? ", " : "") + missing[i];
  if (missing.size() > 5) msg += " and " + std::to_string(missing.size() - 5) + " more";
  throw KeyError(msg);
}

struct OutputEntry {
  std::string key;
  io::DType dtype;
  std::vector<int64_t> shape;
  torch::Tensor tensor;                    // CPU, output dtype; undefined when produced while writing
  std::function<torch::Tensor()> produce;  // full differences are recomputed instead of kept in memory
};

std::string options_record(const ExtractOptions& o) {
  nlohmann::json j;
  j["algo"] = to_string(o.algo);
  j["mode"] = to_string(o.mode);
  j["linear"] = o.linear_param;
  j["conv"] = o.conv_param;
  j["tucker"] = o.tucker;
  if (o.sparse_bias) j["sparsity"] = o.sparsity;
  if (o.budget_bytes > 0) j["budget_bytes"] = o.budget_bytes;
  if (o.budget_params > 0) j["budget_params"] = o.budget_params;
  if (o.budget_bytes > 0 || o.budget_params > 0) j["budget_weight"] = to_string(o.budget_weight);
  return j.dump();
}

std::map<std::string, std::string> output_metadata(const ExtractOptions& o) {
  return {{"lycoris_extract", options_record(o)}};
}

// Drops this process's pages of a tensor's bytes in a mapped input once the layer is done: the mapping is
// read-only MAP_PRIVATE, so the pages come back from the page cache if touched again, and the resident set
// stays at one layer instead of growing to both checkpoints (3.4 GB at SD1.5 scale).
void release_pages(const io::SafetensorsFile& f, const std::string& key) {
#ifdef MADV_DONTNEED
  const auto& info = f.info(key);
  if (info.nbytes() == 0) return;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto at = reinterpret_cast<uintptr_t>(f.data(info));
  const auto begin = at / page * page;
  madvise(reinterpret_cast<void*>(begin), at + info.nbytes() - begin, MADV_DONTNEED);
#endif
}

// tuned − base of one key in fp32 (exact for fp16/bf16 inputs), into `out` when given (a reused buffer).
torch::Tensor difference(const io::SafetensorsFile& base, const io::SafetensorsFile& tuned, const std::string& key,
                         torch::Device device, torch::Tensor out = {}) {
  auto wt = tuned.tensor(key), wb = base.tensor(key);
  if (!out.defined()) out = torch::empty(wt.sizes(), torch::TensorOptions().dtype(torch::kFloat32).device(device));
  out.copy_(wt);
  out.sub_(wb.to(device));  // computed in fp32 (type promotion of the in-place op)
  return out;
}

// max|D|: NaN when D holds a NaN, Inf when it holds an Inf.
double max_abs(const torch::Tensor& D) {
  return torch::linalg_vector_norm(D, INFINITY, c10::nullopt, false, c10::nullopt).item<double>();
}

// For tuned − base of `key` with max|D| = dmax not finite: FormatError naming the input file whose tensor has
// NaN/Inf, else Error for the F32 subtraction itself overflowing.
void require_finite_difference(double dmax, const io::SafetensorsFile& base, const io::SafetensorsFile& tuned,
                               const std::string& key) {
  if (std::isfinite(dmax)) return;
  require_finite(base.tensor(key), base.path(), key);
  require_finite(tuned.tensor(key), tuned.path(), key);
  throw Error(tuned.path() + ": tensor '" + key + "': tuned − base overflows F32 (the difference is computed in F32)");
}

// The reference's test allclose(W_tuned, W_base, rtol 1e-5, atol 1e-8) (fp32), decided from D = W_tuned − W_base
// (dmax = max|D|) without full-size temporaries: max|D| = 0 → close; max|D| above atol + rtol·max|W_base| → the
// element holding max|D| fails its own bound; only in between (rare) is the element-wise test run.
bool unchanged(const torch::Tensor& D, double dmax, const io::SafetensorsFile& base, const io::SafetensorsFile& tuned,
               const std::string& key) {
  if (dmax == 0) return true;
  auto wb = base.tensor(key);
  const double bmax =
      torch::linalg_vector_norm(wb, INFINITY, c10::nullopt, false, torch::kFloat32).item<double>();
  if (dmax > (1e-8 + 1e-5 * bmax) * (1 + 1e-5)) return false;
  return torch::allclose(tuned.tensor(key, torch::kFloat32, D.device()), wb.to(D.device(), torch::kFloat32), 1e-5,
                         1e-8);
}

// One reused fp32 buffer for D: a single allocation of the largest layer instead of fresh pages per layer.
struct Workspace {
  torch::Tensor buffer;
  torch::Tensor take(const std::vector<int64_t>& shape, torch::Device device) {
    const int64_t n = c10::multiply_integers(shape);
    if (!buffer.defined() || buffer.numel() < n || buffer.device() != device)
      buffer = torch::empty({n}, torch::TensorOptions().dtype(torch::kFloat32).device(device));
    return buffer.narrow(0, 0, n).view(shape);
  }
};

// ‖D − ΔW(fit)‖_F with ΔW rebuilt from the stored tensors. A plain LoRA is checked in row blocks of ~4 MB
// (D_b − s·up_b·down, one addmm each, no full-size rebuild); other forms through fit_delta.
double residual_norm(const torch::Tensor& D, const LayerFit& fit) {
  if (fit.form == "diff" || fit.form == "norm") {
    const auto& t = fit.tensors.front().second;
    return (t.to(D.scalar_type()) - D).norm().item<double>();
  }
  TensorMap m(fit.tensors.begin(), fit.tensors.end());
  if (fit.form == "lora" && !m.count("bias_indices")) {
    auto M = F::flat(D);
    auto up = m.at("lora_up.weight").reshape({D.size(0), -1}).to(D.scalar_type());
    auto down = m.at("lora_down.weight").reshape({up.size(1), M.size(1)}).to(D.scalar_type());
    const double scale = F::scalar_value(m.at("alpha"), "extract", "alpha") / static_cast<double>(up.size(1));
    const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(M.size(1), 1));
    double e2 = 0;
    for (int64_t i = 0; i < M.size(0); i += rows) {
      const int64_t n = std::min(rows, M.size(0) - i);
      e2 += std::pow(torch::addmm(M.narrow(0, i, n), up.narrow(0, i, n), down, 1, -scale).norm().item<double>(), 2);
    }
    return std::sqrt(e2);
  }
  if (fit.form == "lokr" || fit.form == "lokr(full w2)") {
    // ‖D − s·W1⊗W2‖² = ‖D‖² − 2s·Σ_uv W1[u,v]·⟨D_uv, W2⟩ + s²‖W1‖²‖W2‖² over the (p, q·k) blocks D_uv, one row
    // block u at a time in fp64 (no rearranged copy of D, no rebuild; fp64 keeps the difference exact enough)
    const auto f64 = torch::kFloat64;
    auto w1 = m.at("lokr_w1").to(f64);
    torch::Tensor w2;
    double scale = 1;
    if (m.count("lokr_w2")) {
      w2 = m.at("lokr_w2").to(f64);
    } else {
      auto a = m.at("lokr_w2_a").to(f64);
      w2 = a.matmul(m.at("lokr_w2_b").to(f64).reshape({a.size(1), -1}));
      scale = F::scalar_value(m.at("alpha"), "extract", "alpha") / static_cast<double>(a.size(1));
    }
    const int64_t A = w1.size(0), C = w1.size(1), P = D.size(0) / A;
    w2 = w2.reshape({P, -1});
    auto blocks = D.reshape({A, P, C, w2.size(1)});
    double d2 = 0, cross = 0;
    for (int64_t u = 0; u < A; ++u) {
      auto Du = blocks.select(0, u).to(f64);  // (p, c, q·k)
      d2 += Du.square().sum().item<double>();
      cross += torch::einsum("pcn,pn->c", {Du, w2}).dot(w1.select(0, u)).item<double>();
    }
    const double e2 = d2 - 2 * scale * cross + scale * scale * w1.square().sum().item<double>() *
                                                   w2.square().sum().item<double>();
    return std::sqrt(std::max(e2, 0.0));
  }
  auto approx = fit_delta(fit, D.sizes()).to(D.scalar_type());
  if (approx.is_alias_of(D)) return (approx - D).norm().item<double>();
  return approx.sub_(D).norm().item<double>();
}

// The result of one layer, produced by a worker and consumed in base order.
struct LayerOutcome {
  enum Kind { Unchanged, Skipped, Dropped, Extracted } kind = Unchanged;
  ExtractLayerReport report;
  std::vector<std::pair<std::string, torch::Tensor>> stored;  // suffix → CPU tensor (output dtype)
  std::vector<std::pair<std::string, std::string>> deferred;  // suffix → key whose tuned − base is written
  io::DType deferred_dtype{};
  std::vector<std::vector<int64_t>> deferred_shapes;
  double err = 0;
};

// A changed layer's weight difference D (in the worker's buffer) and bias change (undefined without a bias);
// D undefined when the layer is unchanged. The layer's input pages are released.
struct LayerDelta {
  torch::Tensor D, bias;
};

LayerDelta load_delta(const naming::BaseLayer& layer, const io::SafetensorsFile& base,
                      const io::SafetensorsFile& tuned, const ExtractOptions& o, Workspace& ws) {
  const auto& bi = base.info(layer.weight_key);
  const auto& ti = tuned.info(layer.weight_key);
  auto done_with_inputs = [&] {
    for (const auto* key : {&layer.weight_key, &layer.bias_key})
      if (!key->empty()) release_pages(base, *key), release_pages(tuned, *key);
  };
  // byte-identical weights (most unchanged layers) need no arithmetic at all
  if (bi.dtype == ti.dtype && bi.nbytes() == ti.nbytes() &&
      std::memcmp(base.data(bi), tuned.data(ti), bi.nbytes()) == 0) {
    done_with_inputs();
    return {};
  }
  LayerDelta d;
  d.D = difference(base, tuned, layer.weight_key, o.device, ws.take(bi.shape, o.device));
  const double dmax = max_abs(d.D);
  require_finite_difference(dmax, base, tuned, layer.weight_key);
  if (unchanged(d.D, dmax, base, tuned, layer.weight_key)) {
    done_with_inputs();
    return {};
  }
  if (!layer.bias_key.empty()) {
    d.bias = difference(base, tuned, layer.bias_key, o.device);
    require_finite_difference(max_abs(d.bias), base, tuned, layer.bias_key);
  }
  done_with_inputs();
  return d;
}

// The report's first fields; Skipped (with the reason) for a layer the mode cannot extract.
LayerOutcome changed_layer(const naming::BaseLayer& layer, const torch::Tensor& D, const ExtractOptions& o) {
  LayerOutcome out;
  auto& lr = out.report;
  lr.module = extract_module_name(o.prefix, layer.path);
  lr.key = layer.weight_key;
  lr.shape = D.sizes().vec();
  lr.delta_norm = D.norm().item<double>();
  if (D.dim() > 5 || (D.dim() == 1 && o.mode != RankMode::Full)) {
    out.kind = LayerOutcome::Skipped;
    lr.form = "skipped";
    lr.note = D.dim() == 1 ? "1-D (norm) layers are extracted only in full mode"
                           : "weights with more than 5 dims are not Linear/Conv layers";
  }
  return out;
}

// One layer by the mode's rule, or (budget mode) as the allocated candidate `chosen`.
LayerOutcome process_layer(const naming::BaseLayer& layer, const io::SafetensorsFile& base,
                           const io::SafetensorsFile& tuned, const ExtractOptions& o, Workspace& ws,
                           const LayerCandidate* chosen = nullptr) {
  const exec::Stopwatch watch;
  auto delta = load_delta(layer, base, tuned, o, ws);
  if (!delta.D.defined()) return {};
  const auto& D = delta.D;
  LayerOutcome out = changed_layer(layer, D, o);
  if (out.kind == LayerOutcome::Skipped) return out;
  auto& lr = out.report;
  LayerFit fit;
  if (chosen) {
    fit = fit_candidate(D, delta.bias, *chosen, o);
  } else if (D.dim() == 1) {
    fit.form = "norm";
    fit.tensors = {{"w_norm", D}};
    if (delta.bias.defined()) fit.tensors.emplace_back("b_norm", delta.bias);
  } else {
    fit = extract_layer(D, delta.bias, o);
  }
  // what the file will hold: floats in the output dtype, all finite
  for (auto& [suffix, t] : fit.tensors) {
    if (torch::isFloatingType(t.scalar_type()))
      t = round_finite(t, o.dtype, "layer " + layer.weight_key, lr.module + "." + suffix,
                       "choose a wider --dtype (bf16, fp32)");
    lr.params += static_cast<uint64_t>(t.numel());
    lr.bytes += static_cast<uint64_t>(t.numel()) * static_cast<uint64_t>(t.element_size());
  }
  if (chosen && (lr.bytes != chosen->bytes || lr.params != chosen->params))
    throw Error("budget: the fit of " + lr.module + " takes " + std::to_string(lr.bytes) + " bytes, not the " +
                std::to_string(chosen->bytes) + " its plan counted (please report this)");
  out.kind = LayerOutcome::Extracted;
  out.err = residual_norm(D, fit);
  const bool full = fit.form == "diff" || fit.form == "norm";
  lr.algo = chosen ? to_string(chosen->algo) : full ? to_string(ExtractAlgo::LoCon) : to_string(o.algo);
  lr.form = fit.form;
  lr.rank = fit.rank;
  lr.note = fit.note;
  lr.rel_error = lr.delta_norm > 0 ? out.err / lr.delta_norm : 0;
  for (auto& [suffix, t] : fit.tensors) {
    if (full) {
      // recomputed from the mapped files while writing: tuned − base of the weight or of the bias
      const bool is_bias = suffix == "diff_b" || suffix == "b_norm";
      out.deferred.emplace_back(suffix, is_bias ? layer.bias_key : layer.weight_key);
      out.deferred_dtype = io::from_torch(t.scalar_type());
      out.deferred_shapes.push_back(t.sizes().vec());
    } else {
      auto c = t.to(torch::kCPU).contiguous();
      out.stored.emplace_back(suffix, c.is_alias_of(D) ? c.clone() : c);  // D is the reused buffer
    }
  }
  lr.seconds = watch.seconds();
  return out;
}

// The floating-point layers of the pair, after the header-only checks (so that a bad pair fails before any
// arithmetic): ShapeError for a weight or bias whose shapes differ.
std::vector<naming::BaseLayer> layers_to_extract(const io::SafetensorsFile& base, const io::SafetensorsFile& tuned) {
  std::vector<naming::BaseLayer> layers;
  for (const auto& layer : naming::base_layers(base.names())) {
    const auto& bi = base.info(layer.weight_key);
    const auto& ti = tuned.info(layer.weight_key);
    if (bi.shape != ti.shape)
      throw ShapeError("extract: '" + layer.weight_key + "' has shape " + F::shape_str(bi.shape) + " in " +
                       base.path() + " but " + F::shape_str(ti.shape) + " in " + tuned.path());
    if (!torch::isFloatingType(io::to_torch(bi.dtype)) || !torch::isFloatingType(io::to_torch(ti.dtype))) continue;
    if (!layer.bias_key.empty() && base.info(layer.bias_key).shape != tuned.info(layer.bias_key).shape)
      throw ShapeError("extract: '" + layer.bias_key + "' has different shapes in the two checkpoints");
    layers.push_back(layer);
  }
  return layers;
}

// Writes the entries in order (atomically, with the options as metadata); returns the tensor bytes written.
uint64_t write_output(const std::string& output, const std::vector<OutputEntry>& entries, const ExtractOptions& o) {
  std::vector<io::TensorDecl> decls;
  for (const auto& e : entries) decls.push_back({e.key, e.dtype, e.shape});
  io::SafetensorsWriter writer(output, decls, output_metadata(o));
  uint64_t bytes = 0;
  for (const auto& e : entries) {
    auto t = e.tensor.defined() ? e.tensor : e.produce();
    writer.write(e.key, t);
    bytes += static_cast<uint64_t>(t.numel()) * static_cast<uint64_t>(t.element_size());
  }
  writer.commit();
  return bytes;
}

// ---------------------------------------------------------------- budget mode (docs/tools.md#budget)

bool budget_mode(const ExtractOptions& o) { return o.budget_bytes > 0 || o.budget_params > 0; }

// What the allocation decided: per layer, the outcome known without a fit (unchanged, skipped, dropped) or the
// candidate to fit.
struct BudgetPlan {
  std::vector<LayerOutcome> known;
  std::vector<std::optional<LayerCandidate>> chosen;
  BudgetAllocation allocation;
  uint64_t budget = 0;  // for the layers: the budget less the file's fixed part (bytes mode)
  uint64_t used = 0;    // the planned file's exact size (bytes mode) or its elements
  double weighted_norm2 = 0;
};

struct LayerSurvey {
  LayerOutcome outcome;  // Unchanged, Skipped, or Extracted (a candidate will be chosen)
  std::vector<LayerCandidate> candidates;
  std::vector<int64_t> bias_shape;
  double weight = 1;
};

// The exact size of the file an allocation gives: the layouts of the chosen candidates in write order.
uint64_t planned_size(const std::vector<LayerSurvey>& kept, const BudgetAllocation& a, const std::string& output,
                      const ExtractOptions& o) {
  std::vector<io::TensorDecl> decls;
  for (size_t j = 0; j < kept.size(); ++j) {
    if (a.choice[j] == 0) continue;
    const auto& lr = kept[j].outcome.report;
    for (const auto& [suffix, t] : candidate_layout(kept[j].candidates[a.choice[j] - 1], lr.shape,
                                                    kept[j].bias_shape, o))
      decls.push_back({lr.module + "." + suffix, io::from_torch(t.scalar_type()), t.sizes().vec()});
  }
  return io::safetensors_size(output, decls, output_metadata(o));
}

LayerSurvey survey_layer(const naming::BaseLayer& layer, const io::SafetensorsFile& base,
                         const io::SafetensorsFile& tuned, const ExtractOptions& o, Workspace& ws,
                         uint64_t max_offset) {
  LayerSurvey s;
  auto delta = load_delta(layer, base, tuned, o, ws);
  if (!delta.D.defined()) return s;
  s.outcome = changed_layer(layer, delta.D, o);
  if (s.outcome.kind == LayerOutcome::Skipped) return s;
  s.outcome.kind = LayerOutcome::Extracted;
  if (delta.bias.defined()) s.bias_shape = delta.bias.sizes().vec();
  s.candidates = layer_candidates(delta.D, s.bias_shape, s.outcome.report.module, o, max_offset,
                                  [&](const LayerFit& fit) { return std::pow(residual_norm(delta.D, fit), 2); });
  if (o.budget_weight == BudgetWeight::BaseNorm) {
    const double w0 = base.tensor(layer.weight_key, torch::kFloat32).norm().item<double>();
    release_pages(base, layer.weight_key);
    if (w0 > 0) s.weight = 1 / (w0 * w0);
  }
  return s;
}

BudgetPlan plan_budget(const std::vector<naming::BaseLayer>& layers, const io::SafetensorsFile& base,
                       const io::SafetensorsFile& tuned, const std::string& output, const ExtractOptions& o,
                       int workers, std::vector<Workspace>& workspaces) {
  BudgetPlan plan;
  const bool bytes = o.budget_bytes > 0;
  const std::string what = bytes ? "--budget" : "--budget-params";
  plan.budget = bytes ? o.budget_bytes : o.budget_params;
  if (bytes) {
    // the file's fixed part: the length prefix, the metadata, the braces and at most 7 bytes of padding
    const uint64_t fixed = io::safetensors_size(output, {}, output_metadata(o)) + 7;
    if (fixed > plan.budget)
      throw OptionError(what + ": " + std::to_string(plan.budget) + " bytes cannot hold even the file's header (" +
                        std::to_string(fixed) + " bytes)");
    plan.budget -= fixed;
  }
  exec::OrderedMap<LayerSurvey> surveys(layers.size(), workers, [&](size_t i, int worker) -> LayerSurvey {
    try {
      return survey_layer(layers[i], base, tuned, o, workspaces[static_cast<size_t>(worker)], o.budget_bytes);
    } catch (...) {
      rethrow_with_context({tuned.path(), base.path()}, "layer " + layers[i].weight_key);
    }
  });
  std::vector<std::vector<BudgetChoice>> choices;
  std::vector<size_t> index;  // choices[j] is layer index[j]
  std::vector<LayerSurvey> kept;
  plan.known.resize(layers.size());
  plan.chosen.resize(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    auto s = surveys.take(i);
    if (s.outcome.kind != LayerOutcome::Extracted) {
      plan.known[i] = std::move(s.outcome);
      continue;
    }
    const double d2 = s.weight * std::pow(s.outcome.report.delta_norm, 2);
    plan.weighted_norm2 += d2;
    std::vector<BudgetChoice> c{{0, d2}};  // dropped
    for (const auto& x : s.candidates) c.push_back({bytes ? x.bytes + x.header : x.params, s.weight * x.error2});
    choices.push_back(std::move(c));
    index.push_back(i);
    kept.push_back(std::move(s));
  }
  if (bytes) {
    plan.allocation = allocate_exact(
        choices, plan.budget, o.budget_bytes,
        [&](const BudgetAllocation& a) { return planned_size(kept, a, output, o); }, what);
    plan.used = planned_size(kept, plan.allocation, output, o);
  } else {
    plan.allocation = allocate_budget(choices, plan.budget, what);
    plan.used = plan.allocation.cost;
  }
  size_t extracted = 0;
  uint64_t smallest = UINT64_MAX;
  for (size_t j = 0; j < index.size(); ++j) {
    const size_t k = plan.allocation.choice[j];
    for (size_t c = 1; c < choices[j].size(); ++c) smallest = std::min(smallest, choices[j][c].cost);
    if (k > 0) {
      plan.chosen[index[j]] = kept[j].candidates[k - 1];
      ++extracted;
      continue;
    }
    auto& out = plan.known[index[j]];
    out = std::move(kept[j].outcome);
    out.kind = LayerOutcome::Dropped;
    out.report.form = "dropped";
    out.report.rel_error = 1;
    out.err = out.report.delta_norm;
  }
  if (extracted == 0 && !index.empty())
    throw OptionError(what + ": " + std::to_string(bytes ? o.budget_bytes : o.budget_params) +
                      " is too small for even one layer at rank 1 (the smallest takes " + std::to_string(smallest) +
                      (bytes ? " bytes with its header entries)" : " parameters)"));
  return plan;
}

// The file must hold what the plan counted: its exact size (bytes mode) or its elements (parameters mode).
void check_within_budget(const std::string& output, const std::vector<OutputEntry>& entries, const ExtractOptions& o) {
  std::vector<io::TensorDecl> decls;
  uint64_t params = 0;
  for (const auto& e : entries) {
    decls.push_back({e.key, e.dtype, e.shape});
    params += static_cast<uint64_t>(c10::multiply_integers(e.shape));
  }
  const uint64_t size = io::safetensors_size(output, decls, output_metadata(o));
  if ((o.budget_bytes > 0 && size > o.budget_bytes) || (o.budget_params > 0 && params > o.budget_params))
    throw Error("budget: the output would take " + std::to_string(size) + " bytes / " + std::to_string(params) +
                " parameters, beyond the budget (please report this)");
}

}  // namespace

ExtractReport extract(const std::string& base_path, const std::string& tuned_path, const std::string& output,
                      const ExtractOptions& o, const std::function<void(const ExtractLayerReport&)>& on_layer) {
  const exec::Stopwatch watch;
  check_options(o);
  io::check_output_path(output);  // before minutes of work
  auto base = io::SafetensorsFile::open(base_path);
  auto tuned = io::SafetensorsFile::open(tuned_path);
  check_same_keys(base, tuned);

  const auto layers = layers_to_extract(base, tuned);  // header-only checks: before any arithmetic

  // Layer-parallel: `workers` layers in flight, each single-threaded (intra-op and BLAS), results consumed in
  // base order. Small per-layer operations (QR of thin sketches, small SVDs, ALS solves) do not scale
  // across threads; independent layers do.
  const int workers = static_cast<int>(
      std::clamp<int64_t>(o.threads > 0 ? o.threads : at::get_num_threads(), 1, std::max<size_t>(layers.size(), 1)));
  exec::IntraOpThreads one_thread(1);
  exec::SingleThreadedBlas blas;  // layer-parallel workers: each BLAS call in its caller's thread
  std::vector<Workspace> workspaces(static_cast<size_t>(workers));
  // budget mode: a first pass over the layers gives every candidate's cost and error, then the allocation
  std::optional<BudgetPlan> plan;
  if (budget_mode(o)) plan = plan_budget(layers, base, tuned, output, o, workers, workspaces);
  exec::OrderedMap<LayerOutcome> results(layers.size(), workers, [&](size_t i, int worker) -> LayerOutcome {
    try {
      if (plan && !plan->chosen[i]) return plan->known[i];
      return process_layer(layers[i], base, tuned, o, workspaces[static_cast<size_t>(worker)],
                           plan ? &*plan->chosen[i] : nullptr);
    } catch (...) {
      rethrow_with_context({tuned.path(), base.path()}, "layer " + layers[i].weight_key);
    }
  });

  ExtractReport report;
  std::vector<OutputEntry> entries;
  std::set<std::string> names;
  double err2 = 0, norm2 = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    LayerOutcome r = results.take(i);
    if (r.kind == LayerOutcome::Unchanged) {
      ++report.unchanged;
      continue;
    }
    auto& lr = r.report;
    if (r.kind == LayerOutcome::Skipped) {
      ++report.skipped;
    } else {
      if (!names.insert(lr.module).second)
        throw KeyError("extract: two layers map to the module name '" + lr.module + "' (colliding paths)");
      err2 += r.err * r.err;
      norm2 += lr.delta_norm * lr.delta_norm;
      if (r.kind == LayerOutcome::Dropped) ++report.dropped;
      for (auto& [suffix, t] : r.stored)
        entries.push_back({lr.module + "." + suffix, io::from_torch(t.scalar_type()), t.sizes().vec(), t, {}});
      for (size_t k = 0; k < r.deferred.size(); ++k) {
        const std::string key = r.deferred[k].second;
        entries.push_back({lr.module + "." + r.deferred[k].first, r.deferred_dtype, r.deferred_shapes[k], {},
                           [&base, &tuned, key, dtype = o.dtype] {
                             auto t = difference(base, tuned, key, torch::kCPU).to(dtype);
                             release_pages(base, key), release_pages(tuned, key);
                             return t;
                           }});
      }
    }
    report.layers.push_back(lr);
    if (on_layer) on_layer(lr);
  }
  report.total_rel_error = norm2 > 0 ? std::sqrt(err2 / norm2) : 0;
  if (plan) {
    check_within_budget(output, entries, o);
    const auto& a = plan->allocation;
    const uint64_t fixed = o.budget_bytes > 0 ? o.budget_bytes - plan->budget : 0;
    report.budget = o.budget_bytes > 0 ? o.budget_bytes : o.budget_params;
    report.budget_used = plan->used;
    report.certified_cost = a.certified_cost + fixed;
    const double n2 = plan->weighted_norm2;
    report.certified_rel_error = n2 > 0 ? std::sqrt(a.certified_error / n2) : 0;
    report.lower_rel_error = n2 > 0 ? std::sqrt(a.lower_bound / n2) : 0;
  }

  report.bytes_written = write_output(output, entries, o);
  report.tensors_written = entries.size();
  {
    std::vector<io::TensorDecl> decls;
    for (const auto& e : entries) decls.push_back({e.key, e.dtype, e.shape});
    report.file_bytes = io::safetensors_size(output, decls, output_metadata(o));
  }
  report.seconds = watch.seconds();
  return report;
}

}  // namespace lycoris::tools
