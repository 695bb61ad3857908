// `lycoris resize ADAPTER --output OUT (--dim N | --ratio X | --threshold X | --budget SIZE) [--device D]
//                  [--threads N] [-q] [--json]`
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "common.hpp"
#include "lycoris/text.hpp"
#include "lycoris/error.hpp"
#include "lycoris/tools/budget.hpp"
#include "lycoris/tools/resize.hpp"

namespace lycoris::cli {

void register_resize(CLI::App& app) {
  struct Args {
    std::string input, output, device = "cpu", budget;
    int64_t dim = 0;
    double ratio = 0, threshold = 0;
    int threads = 0;
    bool quiet = false, json = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("resize", "reduce the rank of LoRA/LoCon/DyLoRA modules (best rank-N ΔW)");
  cmd->add_option("adapter", args->input, "adapter file (.safetensors)")->required();
  cmd->add_option("-o,--output", args->output, "output adapter (written atomically)")->required();
  auto* dim = cmd->add_option("--dim", args->dim, "new rank N (modules of lower rank keep theirs)");
  auto* ratio = cmd->add_option("--ratio", args->ratio, "keep σ > X·σ_max (0 ≤ X ≤ 1)");
  auto* threshold = cmd->add_option("--threshold", args->threshold, "keep σ > X (X ≥ 0)");
  auto* budget = cmd->add_option("--budget", args->budget,
                                 "output file size limit, header included (32M = 32e6 bytes, 32MiB = 32·2^20): "
                                 "ranks allocated across modules for the least total error");
  dim->excludes(ratio)->excludes(threshold)->excludes(budget);
  ratio->excludes(threshold)->excludes(budget);
  threshold->excludes(budget);
  cmd->add_flag("--json", args->json, "the report as JSON on stdout");
  cmd->add_option("--device", args->device, "device for the SVDs")->capture_default_str();
  cmd->add_option("--threads", args->threads, "torch threads (0: leave as is)");
  cmd->add_flag("-q,--quiet", args->quiet, "only the summary line");
  cmd->callback([args, dim, ratio, threshold, budget] {
    auto& a = *args;
    tools::ResizeOptions o;
    if (dim->count()) o.rule = {tools::RankMode::Fixed, static_cast<double>(a.dim)};
    else if (ratio->count()) o.rule = {tools::RankMode::Ratio, a.ratio};
    else if (threshold->count()) o.rule = {tools::RankMode::Threshold, a.threshold};
    else if (budget->count()) o.budget_bytes = tools::parse_byte_size(a.budget, "--budget");
    else throw OptionError("resize: give one of --dim, --ratio, --threshold, --budget");
    o.device = parse_device(a.device);
    o.threads = a.threads == 0 ? 0 : thread_count(a.threads);
    auto r = tools::resize(a.input, a.output, o);
    if (a.json) {
      nlohmann::ordered_json j;
      j["modules"] = nlohmann::ordered_json::array();
      for (const auto& m : r.modules)
        j["modules"].push_back({{"module", m.module}, {"algo", m.algo}, {"old_rank", m.old_rank},
                                {"new_rank", m.new_rank}, {"resized", m.resized}, {"dropped", m.dropped},
                                {"bytes", m.bytes}, {"retained_energy", m.retained_energy},
                                {"rel_error", std::sqrt(std::max(0.0, 1 - m.retained_energy))}, {"note", m.note}});
      j["totals"] = {{"resized", r.resized}, {"copied", r.copied}, {"dropped", r.dropped},
                     {"file_bytes", r.file_bytes}, {"retained_energy", r.retained_energy},
                     {"rel_error", std::sqrt(std::max(0.0, 1 - r.retained_energy))}, {"seconds", r.seconds}};
      if (o.budget_bytes > 0) j["totals"]["budget"] = o.budget_bytes;
      std::cout << j.dump(2) << "\n";
      return;
    }
    if (!a.quiet)
      for (const auto& m : r.modules) {
        if (m.dropped)
          std::printf("%-60s rank %lld -> 0  dropped (budget)\n", escape_control(m.module).c_str(),
                      static_cast<long long>(m.old_rank));
        else if (m.resized)
          std::printf("%-60s rank %lld -> %lld  retained energy %.6f%s%s\n", escape_control(m.module).c_str(),
                      static_cast<long long>(m.old_rank), static_cast<long long>(m.new_rank), m.retained_energy,
                      m.note.empty() ? "" : "  ", escape_control(m.note).c_str());
        else
          std::printf("%-60s %s\n", escape_control(m.module).c_str(), escape_control(m.note).c_str());
      }
    std::printf("resized %zu module(s), copied %zu unchanged, dropped %zu, into %s (%llu bytes): retained energy "
                "%.6f, %.2f s\n", r.resized, r.copied, r.dropped, a.output.c_str(),
                static_cast<unsigned long long>(r.file_bytes), r.retained_energy, r.seconds);
  });
}

}  // namespace lycoris::cli
