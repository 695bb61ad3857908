// `lycoris convert ADAPTER --to kohya|peft|lycoris --output OUT [--base BASE] [--base-format auto|diffusers|ldm]`
// `lycoris convert ADAPTER --for comfyui|sdwebui|sdcpp --output OUT [--base BASE] [--strength S] [--json]`
#include <cstdio>
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "common.hpp"
#include "lycoris/error.hpp"
#include "lycoris/tools/convert.hpp"
#include "lycoris/tools/convert_for.hpp"

namespace lycoris::cli {

void register_convert(CLI::App& app) {
  struct Args {
    std::string input, output, to, loader, base, base_format = "auto";
    double strength = 1.0;
    bool quiet = false, json = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("convert", "rewrite an adapter's names between lycoris, kohya and peft (ΔW unchanged)");
  cmd->add_option("adapter", args->input, "adapter file (.safetensors)")->required();
  auto* to = cmd->add_option("--to", args->to, "target naming: lycoris|kohya|peft");
  auto* for_ = cmd->add_option("--for", args->loader,
                               "rewrite what a loader would misapply into forms it applies exactly: "
                               "comfyui|sdwebui|sdcpp");
  to->excludes(for_);
  cmd->add_option("--strength", args->strength, "--for: where strength-dependent modules (DoRA, OFT) are baked")
      ->capture_default_str();
  cmd->add_flag("--json", args->json, "--for: JSON report on stdout");
  cmd->add_option("-o,--output", args->output, "output file (written atomically)")->required();
  cmd->add_option("--base", args->base, "base checkpoint: exact dotted paths for PEFT output; with --for, the layers");
  cmd->add_option("--base-format", args->base_format, "layout of --base: auto|diffusers|ldm")->capture_default_str();
  cmd->add_flag("-q,--quiet", args->quiet, "no summary line");
  cmd->callback([args] {
    auto& a = *args;
    if (!a.loader.empty()) {
      tools::ConvertForOptions fo;
      fo.loader = a.loader;
      fo.base = a.base;
      fo.strength = a.strength;
      auto r = tools::convert_for(a.input, a.output, fo);
      for (const auto& w : r.warnings) warn(w);
      if (a.json) std::cout << r.json() << "\n";
      else if (!a.quiet) std::cout << r.text();
      return;
    }
    if (a.to.empty()) throw OptionError("convert: one of --to or --for is required");
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
