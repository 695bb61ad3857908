// `lycoris extract BASE TUNED --output OUT [--algo locon|loha|lokr] [--mode fixed|threshold|ratio|quantile|full]
//                   [--linear-dim N] [--conv-dim N] [--linear-threshold X] [--conv-threshold X] [--linear-ratio X]
//                   [--conv-ratio X] [--linear-quantile X] [--conv-quantile X] [--use-sparse-bias] [--sparsity S]
//                   [--tucker] [--prefix lycoris|kohya|P] [--dtype fp16|bf16|fp32] [--svd auto|full|randomized]
//                   [--loha-iters N] [--loha-tol X] [--factor F] [--device D] [--threads N] [-q]`
// Defaults follow tools/extract_locon.py (dims 1, thresholds/ratios 0, quantiles 1, sparsity 0.98, fp16).
#include <cstdio>
#include <memory>

#include "commands.hpp"
#include "common.hpp"
#include "lycoris/text.hpp"
#include "lycoris/error.hpp"
#include "lycoris/tools/extract.hpp"

namespace lycoris::cli {

void register_extract(CLI::App& app) {
  struct Args {
    std::string base, tuned, output, algo = "locon", mode = "fixed", prefix = "lycoris", dtype = "fp16";
    std::string device = "cpu", svd = "auto";
    int64_t linear_dim = 1, conv_dim = 1, loha_iters = 10, factor = -1;
    double loha_tol = 1e-2;
    double linear_threshold = 0, conv_threshold = 0, linear_ratio = 0, conv_ratio = 0;
    double linear_quantile = 1, conv_quantile = 1, sparsity = 0.98;
    bool sparse_bias = false, tucker = false, quiet = false;
    int threads = 0;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("extract", "extract a LoCon/LoHa/LoKr adapter from TUNED − BASE");
  cmd->add_option("base", args->base, "base checkpoint (.safetensors)")->required();
  cmd->add_option("tuned", args->tuned, "fine-tuned checkpoint with the same layers")->required();
  cmd->add_option("-o,--output", args->output, "output adapter (written atomically)")->required();
  cmd->add_option("--algo", args->algo, "locon | loha | lokr")->capture_default_str();
  cmd->add_option("--mode", args->mode, "rank selection: fixed | threshold | ratio | quantile | full")
      ->capture_default_str();
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
  cmd->callback([args] {
    auto& a = *args;
    tools::ExtractOptions o;
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
    const bool quiet = a.quiet;
    auto r = tools::extract(a.base, a.tuned, a.output, o, [quiet](const tools::ExtractLayerReport& l) {
      if (quiet) return;
      if (l.form == "skipped")
        std::printf("%-60s skipped (%s)\n", escape_control(l.module).c_str(), escape_control(l.note).c_str());
      else
        std::printf("%-60s %-13s rank %-5lld rel.err %.4e  %.2f s%s%s\n", escape_control(l.module).c_str(), l.form.c_str(),
                    static_cast<long long>(l.rank), l.rel_error, l.seconds, l.note.empty() ? "" : "  ",
                    escape_control(l.note).c_str());
    });
    size_t extracted = r.layers.size() - r.skipped;
    std::printf("extracted %zu layer(s) (%zu unchanged, %zu skipped) into %s: %zu tensors, %.1f MB, "
                "total relative error %.4e, %.2f s\n",
                extracted, r.unchanged, r.skipped, a.output.c_str(), r.tensors_written,
                static_cast<double>(r.bytes_written) / 1e6, r.total_rel_error, r.seconds);
  });
}

}  // namespace lycoris::cli
