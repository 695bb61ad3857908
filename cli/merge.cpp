// `lycoris merge BASE ADAPTER... --output OUT [--weight W]... [--dtype keep|fp32|fp16|bf16] [--device D]
//                 [--allow-unmatched] [--base-format auto|diffusers|ldm] [--threads N] [--progress]`
// BASE may be a TorchScript archive (model.pt): lycoris::torchscript::merge_archive, OUT an archive too.
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <thread>

#include "commands.hpp"
#include "common.hpp"
#include "lycoris/error.hpp"
#include "lycoris/jit.hpp"
#include "lycoris/text.hpp"
#include "lycoris/tools/merge.hpp"

namespace lycoris::cli {

namespace {


// One-line progress bar on stderr, redrawn at most every 100 ms: bytes done, tensor count, elapsed time,
// ETA (from the data rate since the first tensor, so adapter loading does not skew it), current tensor.
class ProgressBar {
 public:
  void update(const tools::MergeProgress& p) {
    if (p.index == 1) first_ = {p.seconds, p.bytes_done};
    auto now = std::chrono::steady_clock::now();
    if (p.index != p.total && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    const double frac = p.bytes_total ? static_cast<double>(p.bytes_done) / static_cast<double>(p.bytes_total)
                                      : static_cast<double>(p.index) / static_cast<double>(p.total ? p.total : 1);
    const double dt = p.seconds - first_.first, db = static_cast<double>(p.bytes_done - first_.second);
    const double eta = db > 0 && dt > 0 ? static_cast<double>(p.bytes_total - p.bytes_done) * dt / db : 0.0;
    const int width = 30, filled = static_cast<int>(frac * width);
    std::string name = p.key ? escape_control(*p.key) : "";
    if (name.size() > 40) name = "…" + name.substr(name.size() - 39);
    std::fprintf(stderr, "\r[%s%s] %3d%% %zu/%zu %5.1fs ETA %5.1fs %-40s",
                 std::string(static_cast<size_t>(filled), '#').c_str(),
                 std::string(static_cast<size_t>(width - filled), '.').c_str(), static_cast<int>(frac * 100), p.index,
                 p.total, p.seconds, p.index == p.total ? 0.0 : eta, name.c_str());
    if (p.index == p.total) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }

 private:
  std::chrono::steady_clock::time_point last_{};
  std::pair<double, uint64_t> first_{0.0, 0};
};

// "12 + 3": the modules applied per adapter, for the summary line.
std::string per_adapter(const std::vector<size_t>& modules) {
  std::string out;
  for (size_t i = 0; i < modules.size(); ++i) out += (i ? " + " : "") + std::to_string(modules[i]);
  return out;
}

}  // namespace

void register_merge(CLI::App& app) {
  struct Args {
    std::string base, output, dtype = "keep", device = "cpu";
    std::vector<std::string> adapters;
    std::vector<std::string> weights;
    bool allow_unmatched = false, progress = false, quiet = false, force = false;
    std::string base_format = "auto";
    int threads = 0;
    uint64_t buffer_mb = tools::MergeOptions().max_bytes_in_flight >> 20;  // one default: the library's
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("merge", "merge adapters into a base checkpoint (streaming, fp32 math)");
  cmd->add_option("base", args->base, "base checkpoint (.safetensors) or TorchScript model (.pt)")->required();
  cmd->add_option("adapters", args->adapters, "adapter files, applied in order")->required();
  cmd->add_option("-o,--output", args->output, "output checkpoint (written atomically)")->required();
  cmd->add_option("-w,--weight", args->weights, "multiplier per adapter, in order (default 1.0 each)");
  cmd->add_flag("--force", args->force, "accept weights beyond ±1e6");
  cmd->add_option("--dtype", args->dtype, "output dtype of float tensors: keep|fp32|fp16|bf16|fp64")
      ->capture_default_str();
  cmd->add_option("--device", args->device, "device for the ΔW math (cpu, cuda, cuda:1, …)")->capture_default_str();
  cmd->add_flag("--allow-unmatched", args->allow_unmatched,
                "skip adapter modules that match no base tensor or the wrong shape (warning instead of error)");
  cmd->add_option("--base-format", args->base_format, "layout of the base's keys: auto|diffusers|ldm")
      ->capture_default_str();
  cmd->add_option("--threads", args->threads, "torch threads (default: hardware threads)");
  cmd->add_flag("--progress", args->progress, "progress bar even when stderr is not a terminal");
  cmd->add_option("--buffer-mb", args->buffer_mb, "read-ahead budget of the pipeline in MiB")->capture_default_str();
  cmd->add_flag("-q,--quiet", args->quiet, "no summary line");
  cmd->callback([args] {
    auto& a = *args;
#ifdef __GLIBC__
    // Merging allocates and frees tensors of tens of MB per layer. glibc serves those with fresh mmaps,
    // so every tensor pays its page faults again (measured: 180 ms → 5 ms for one 13M-element op on
    // this VM). Keep freed memory in the heap instead; peak memory is still bounded by the pipeline.
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
    if (!a.weights.empty() && a.weights.size() != a.adapters.size())
      throw OptionError("merge: " + std::to_string(a.weights.size()) + " --weight value(s) for " +
                        std::to_string(a.adapters.size()) + " adapter(s): give one per adapter, in order");
    tools::MergeOptions opt;
    for (size_t i = 0; i < a.adapters.size(); ++i)
      opt.adapters.push_back({a.adapters[i], a.weights.empty() ? 1.0 : parse_weight(a.weights[i], a.force)});
    opt.dtype = parse_dtype(a.dtype, {torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kFloat64}, /*keep=*/true);
    if (torchscript::is_archive(a.base)) {  // a TorchScript model: merged into its parameters, saved as an archive
      if (opt.dtype || a.base_format != "auto")
        throw OptionError("merge: --dtype and --base-format apply to safetensors checkpoints; " + a.base +
                          " is a TorchScript archive (its tensors keep their dtypes)");
      at::set_num_threads(thread_count(a.threads));
      const auto r = torchscript::merge_archive(a.base, a.output, opt.adapters, a.allow_unmatched);
      for (const auto& w : r.warnings) warn(w);
      if (!a.quiet)
        std::printf("merged %zu adapter(s) (%s modules) into %s: TorchScript archive, %zu layers modified, %.2f s\n",
                    a.adapters.size(), per_adapter(r.modules_applied).c_str(), a.output.c_str(), r.layers, r.seconds);
      return;
    }
    opt.device = parse_device(a.device);
    opt.allow_unmatched = a.allow_unmatched;
    opt.base_format = naming::parse_base_format(a.base_format);
    opt.max_bytes_in_flight = a.buffer_mb << 20;
    opt.threads = thread_count(a.threads);
    opt.on_warning = [](const std::string& w) { warn(w); };
    ProgressBar bar;
    if (a.progress || isatty(STDERR_FILENO)) opt.on_progress = [&bar](const tools::MergeProgress& p) { bar.update(p); };
    auto r = tools::merge(a.base, a.output, opt);
    if (!a.quiet) {
      std::printf("merged %zu adapter(s) (%s modules) into %s: %zu tensors, %zu modified, %.2f s "
                  "(load %.2f s; busy: read %.2f s, compute %.2f s, write+commit %.2f s)\n",
                  a.adapters.size(), per_adapter(r.modules_applied).c_str(), a.output.c_str(), r.tensors, r.modified,
                  r.total_seconds, r.load_seconds, r.read_seconds, r.compute_seconds, r.write_seconds);
    }
  });
}

}  // namespace lycoris::cli
