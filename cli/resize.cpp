// `lycoris resize ADAPTER --output OUT (--dim N | --ratio X | --threshold X) [--device D] [--threads N] [-q]`
#include <cstdio>
#include <memory>

#include "commands.hpp"
#include "common.hpp"
#include "lycoris/text.hpp"
#include "lycoris/error.hpp"
#include "lycoris/tools/resize.hpp"

namespace lycoris::cli {

void register_resize(CLI::App& app) {
  struct Args {
    std::string input, output, device = "cpu";
    int64_t dim = 0;
    double ratio = 0, threshold = 0;
    int threads = 0;
    bool quiet = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("resize", "reduce the rank of LoRA/LoCon/DyLoRA modules (best rank-N ΔW)");
  cmd->add_option("adapter", args->input, "adapter file (.safetensors)")->required();
  cmd->add_option("-o,--output", args->output, "output adapter (written atomically)")->required();
  auto* dim = cmd->add_option("--dim", args->dim, "new rank N (modules of lower rank keep theirs)");
  auto* ratio = cmd->add_option("--ratio", args->ratio, "keep σ > X·σ_max (0 ≤ X ≤ 1)");
  auto* threshold = cmd->add_option("--threshold", args->threshold, "keep σ > X (X ≥ 0)");
  dim->excludes(ratio)->excludes(threshold);
  ratio->excludes(threshold);
  cmd->add_option("--device", args->device, "device for the SVDs")->capture_default_str();
  cmd->add_option("--threads", args->threads, "torch threads (0: leave as is)");
  cmd->add_flag("-q,--quiet", args->quiet, "only the summary line");
  cmd->callback([args, dim, ratio, threshold] {
    auto& a = *args;
    tools::ResizeOptions o;
    if (dim->count()) o.rule = {tools::RankMode::Fixed, static_cast<double>(a.dim)};
    else if (ratio->count()) o.rule = {tools::RankMode::Ratio, a.ratio};
    else if (threshold->count()) o.rule = {tools::RankMode::Threshold, a.threshold};
    else throw OptionError("resize: give one of --dim, --ratio, --threshold");
    o.device = parse_device(a.device);
    o.threads = a.threads == 0 ? 0 : thread_count(a.threads);
    auto r = tools::resize(a.input, a.output, o);
    if (!a.quiet)
      for (const auto& m : r.modules) {
        if (m.resized)
          std::printf("%-60s rank %lld -> %lld  retained energy %.6f%s%s\n", escape_control(m.module).c_str(),
                      static_cast<long long>(m.old_rank), static_cast<long long>(m.new_rank), m.retained_energy,
                      m.note.empty() ? "" : "  ", escape_control(m.note).c_str());
        else
          std::printf("%-60s %s\n", escape_control(m.module).c_str(), escape_control(m.note).c_str());
      }
    std::printf("resized %zu module(s), copied %zu unchanged, into %s: retained energy %.6f, %.2f s\n", r.resized,
                r.copied, a.output.c_str(), r.retained_energy, r.seconds);
  });
}

}  // namespace lycoris::cli
