// `lycoris convert ADAPTER --to kohya|peft|lycoris --output OUT [--base BASE] [--base-format auto|diffusers|ldm]`
#include <cstdio>
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "common.hpp"
#include "lycoris/error.hpp"
#include "lycoris/tools/convert.hpp"

namespace lycoris::cli {

void register_convert(CLI::App& app) {
  struct Args {
    std::string input, output, to, base, base_format = "auto";
    bool quiet = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("convert", "rewrite an adapter's names between lycoris, kohya and peft (ΔW unchanged)");
  cmd->add_option("adapter", args->input, "adapter file (.safetensors)")->required();
  cmd->add_option("--to", args->to, "target naming: lycoris|kohya|peft")->required();
  cmd->add_option("-o,--output", args->output, "output file (written atomically)")->required();
  cmd->add_option("--base", args->base, "base checkpoint: exact dotted paths for PEFT output");
  cmd->add_option("--base-format", args->base_format, "layout of --base: auto|diffusers|ldm")->capture_default_str();
  cmd->add_flag("-q,--quiet", args->quiet, "no summary line");
  cmd->callback([args] {
    auto& a = *args;
    tools::ConvertOptions o;
    o.to = tools::parse_adapter_format(a.to);
    o.base = a.base;
    o.base_format = naming::parse_base_format(a.base_format);
    auto r = tools::convert(a.input, a.output, o);
    for (const auto& w : r.warnings) warn(w);
    if (!a.quiet)
      std::printf("converted %zu module(s) (%zu tensors) from %s to %s: %s%s\n", r.modules, r.tensors,
                  tools::to_string(r.from), tools::to_string(o.to), a.output.c_str(),
                  r.folded ? (" (alpha folded into " + std::to_string(r.folded) + " module(s))").c_str() : "");
  });
}

}  // namespace lycoris::cli
