// `lycoris extract BASE TUNED --output OUT [--algo locon|loha|lokr] [--mode fixed|threshold|ratio|quantile|full]
//                   [--linear-dim N] [--conv-dim N] [--linear-threshold X] [--conv-threshold X] [--linear-ratio X]
//                   [--conv-ratio X] [--linear-quantile X] [--conv-quantile X] [--use-sparse-bias] [--sparsity S]
//                   [--tucker] [--prefix lycoris|kohya|P] [--dtype fp16|bf16|fp32] [--svd auto|full|randomized]
//                   [--loha-iters N] [--loha-tol X] [--factor F] [--device D] [--threads N] [-q]
//                   [--budget SIZE | --budget-params N] [--budget-weight none|base-norm] [--algo auto] [--json]`
// Defaults follow tools/extract_locon.py (dims 1, thresholds/ratios 0, quantiles 1, sparsity 0.98, fp16).
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "common.hpp"
#include "lycoris/text.hpp"
#include "lycoris/error.hpp"
#include "lycoris/tools/budget.hpp"
#include "lycoris/tools/extract.hpp"

namespace lycoris::cli {

namespace {

// The report as JSON (docs/tools.md#budget-report): one object per changed layer, then the totals.
nlohmann::ordered_json extract_json(const tools::ExtractReport& r, const tools::ExtractOptions& o) {
  nlohmann::ordered_json j;
  j["layers"] = nlohmann::ordered_json::array();
  for (const auto& l : r.layers)
    j["layers"].push_back({{"module", l.module},   {"key", l.key},           {"shape", l.shape},
                           {"algo", l.algo},       {"form", l.form},         {"rank", l.rank},
                           {"bytes", l.bytes},     {"params", l.params},     {"rel_error", l.rel_error},
                           {"delta_norm", l.delta_norm}, {"seconds", l.seconds}, {"note", l.note}});
  nlohmann::ordered_json t{{"layers", r.layers.size() - r.skipped - r.dropped},
                           {"unchanged", r.unchanged},
                           {"skipped", r.skipped},
                           {"dropped", r.dropped},
                           {"tensors", r.tensors_written},
                           {"tensor_bytes", r.bytes_written},
                           {"file_bytes", r.file_bytes},
                           {"total_rel_error", r.total_rel_error},
                           {"seconds", r.seconds}};
  if (r.budget > 0) {
    t["budget"] = {{"unit", o.budget_bytes > 0 ? "bytes" : "params"},
                   {"limit", r.budget},
                   {"used", r.budget_used},
                   {"weight", tools::to_string(o.budget_weight)},
                   {"certified_cost", r.certified_cost},
                   {"certified_rel_error", r.certified_rel_error},
                   {"lower_rel_error", r.lower_rel_error}};
  }
  j["totals"] = t;
  return j;
}

struct ExtractArgs {
  std::string base, tuned, output, algo = "locon", mode = "fixed", prefix = "lycoris", dtype = "fp16";
  std::string device = "cpu", svd = "auto";
  int64_t linear_dim = 1, conv_dim = 1, loha_iters = 10, factor = -1;
  double loha_tol = 1e-2;
  double linear_threshold = 0, conv_threshold = 0, linear_ratio = 0, conv_ratio = 0;
  double linear_quantile = 1, conv_quantile = 1, sparsity = 0.98;
  std::string budget, budget_params, budget_weight = "none";
  bool sparse_bias = false, tucker = false, quiet = false, json = false;
  int threads = 0;
};

// The command: options → tools::extract, then the report (text or JSON).
void run_extract(const ExtractArgs& a, bool has_budget, bool has_budget_params) {
  tools::ExtractOptions o;
  if (has_budget) o.budget_bytes = tools::parse_byte_size(a.budget, "--budget");
  if (has_budget_params) o.budget_params = tools::parse_byte_size(a.budget_params, "--budget-params");
  o.budget_weight = tools::parse_budget_weight(a.budget_weight);
  o.algo = tools::parse_extract_algo(a.algo);
  o.mode = tools::parse_rank_mode(a.mode);
  switch (o.mode) {
    case tools::RankMode::Fixed:
      o.linear_param = static_cast<double>(a.linear_dim), o.conv_param = static_cast<double>(a.conv_dim);
      break;
    case tools::RankMode::Threshold: o.linear_param = a.linear_threshold, o.conv_param = a.conv_threshold; break;
    case tools::RankMode::Ratio: o.linear_param = a.linear_ratio, o.conv_param = a.conv_ratio; break;
    case tools::RankMode::Quantile: o.linear_param = a.linear_quantile, o.conv_param = a.conv_quantile; break;
    case tools::RankMode::Full: break;
  }
  o.sparse_bias = a.sparse_bias;
  o.sparsity = a.sparsity;
  o.tucker = a.tucker;
  o.prefix = a.prefix;
  o.dtype = *parse_dtype(a.dtype, {torch::kFloat16, torch::kBFloat16, torch::kFloat32}, /*keep=*/false);
  o.svd = functional::parse_svd_method(a.svd);
  o.loha_iters = a.loha_iters;
  o.loha_tol = a.loha_tol;
  o.lokr_factor = a.factor;
  o.device = parse_device(a.device);
  o.threads = a.threads == 0 ? 0 : thread_count(a.threads);
  const bool quiet = a.quiet || a.json;
  auto r = tools::extract(a.base, a.tuned, a.output, o, [quiet](const tools::ExtractLayerReport& l) {
    if (quiet) return;
    if (l.form == "skipped" || l.form == "dropped")
      std::printf("%-60s %s (%s)\n", escape_control(l.module).c_str(), l.form.c_str(),
                  l.form == "dropped" ? "rank 0 under the budget" : escape_control(l.note).c_str());
    else
      std::printf("%-60s %-5s %-13s rank %-5lld %10llu B  rel.err %.4e  %.2f s%s%s\n",
                  escape_control(l.module).c_str(), l.algo.c_str(), l.form.c_str(), static_cast<long long>(l.rank),
                  static_cast<unsigned long long>(l.bytes), l.rel_error, l.seconds, l.note.empty() ? "" : "  ",
                  escape_control(l.note).c_str());
  });
  if (a.json) {
    std::cout << extract_json(r, o).dump(2) << "\n";
    return;
  }
  size_t extracted = r.layers.size() - r.skipped - r.dropped;
  std::printf("extracted %zu layer(s) (%zu unchanged, %zu skipped, %zu dropped) into %s: %zu tensors, %.1f MB "
              "(file %llu bytes), total relative error %.4e, %.2f s\n",
              extracted, r.unchanged, r.skipped, r.dropped, a.output.c_str(), r.tensors_written,
              static_cast<double>(r.bytes_written) / 1e6, static_cast<unsigned long long>(r.file_bytes),
              r.total_rel_error, r.seconds);
  if (r.budget > 0)
    std::printf("budget %llu %s, used %llu; no allocation within the budget has a total relative error below "
                "%.4e (docs/tools.md#budget-optimality)\n",
                static_cast<unsigned long long>(r.budget), o.budget_bytes > 0 ? "bytes" : "parameters",
                static_cast<unsigned long long>(r.budget_used), r.lower_rel_error);
}

}  // namespace

void register_extract(CLI::App& app) {
  auto args = std::make_shared<ExtractArgs>();
  auto* cmd = app.add_subcommand("extract", "extract a LoCon/LoHa/LoKr adapter from TUNED − BASE");
  cmd->add_option("base", args->base, "base checkpoint (.safetensors)")->required();
  cmd->add_option("tuned", args->tuned, "fine-tuned checkpoint with the same layers")->required();
  cmd->add_option("-o,--output", args->output, "output adapter (written atomically)")->required();
  cmd->add_option("--algo", args->algo, "locon | loha | lokr | auto (per layer, with a budget)")->capture_default_str();
  auto* mode = cmd->add_option("--mode", args->mode, "rank selection: fixed | threshold | ratio | quantile | full")
                   ->capture_default_str();
  auto* budget = cmd->add_option("--budget", args->budget,
                                 "file size limit, header included (32M = 32e6 bytes, 32MiB = 32·2^20): ranks "
                                 "allocated across layers for the least total error");
  auto* budget_params = cmd->add_option("--budget-params", args->budget_params,
                                        "the same with a limit on the written parameters (elements)");
  budget->excludes(budget_params)->excludes(mode);
  budget_params->excludes(mode);
  cmd->add_option("--budget-weight", args->budget_weight,
                  "budget objective: none (Σ‖D − ΔW‖²) | base-norm (Σ‖D − ΔW‖²/‖W_base‖²)")
      ->capture_default_str();
  cmd->add_flag("--json", args->json, "the report as JSON on stdout");
  cmd->add_option("--linear-dim", args->linear_dim, "rank of Linear / 1x1 conv layers (fixed)")->capture_default_str();
  cmd->add_option("--conv-dim", args->conv_dim, "rank of convs with kernel > 1 (fixed)")->capture_default_str();
  cmd->add_option("--linear-threshold", args->linear_threshold, "keep σ > X (threshold)")->capture_default_str();
  cmd->add_option("--conv-threshold", args->conv_threshold, "keep σ > X (threshold)")->capture_default_str();
  cmd->add_option("--linear-ratio", args->linear_ratio, "keep σ > X·σ_max (ratio)")->capture_default_str();
  cmd->add_option("--conv-ratio", args->conv_ratio, "keep σ > X·σ_max (ratio)")->capture_default_str();
  cmd->add_option("--linear-quantile", args->linear_quantile, "keep while cumulative Σσ < X·Σσ (quantile)")
      ->capture_default_str();
  cmd->add_option("--conv-quantile", args->conv_quantile, "keep while cumulative Σσ < X·Σσ (quantile)")
      ->capture_default_str();
  cmd->add_flag("--use-sparse-bias", args->sparse_bias, "also store the largest residual entries (LoCon)");
  cmd->add_option("--sparsity", args->sparsity, "fraction of residual entries dropped")->capture_default_str();
  cmd->add_flag("--tucker", args->tucker, "LoCon convs with kernel > 1: Tucker (lora_mid) like the reference");
  cmd->add_option("--prefix", args->prefix, "module name prefix: lycoris | kohya (lora_unet/lora_te) | any")
      ->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "output float dtype: fp16 | bf16 | fp32")->capture_default_str();
  cmd->add_option("--svd", args->svd, "top-r SVD: auto | full | randomized")->capture_default_str();
  cmd->add_option("--loha-iters", args->loha_iters, "LoHa: alternating least-squares sweeps at most")
      ->capture_default_str();
  cmd->add_option("--loha-tol", args->loha_tol, "LoHa: stop when a sweep lowers the squared error by less")
      ->capture_default_str();
  cmd->add_option("--factor", args->factor, "LoKr: factorization bound (-1: balanced)")->capture_default_str();
  cmd->add_option("--device", args->device, "device for the SVDs (cpu, cuda, …)")->capture_default_str();
  cmd->add_option("--threads", args->threads, "layers in flight, one thread each (0: torch's thread count)");
  cmd->add_flag("-q,--quiet", args->quiet, "only the summary line");
  cmd->callback([args, budget, budget_params] {
    run_extract(*args, budget->count() > 0, budget_params->count() > 0);
  });
}

}  // namespace lycoris::cli
