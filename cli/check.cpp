// `lycoris check ADAPTER --base BASE [--json] [--base-format auto|diffusers|ldm]`
// Exit code: 0 clean, 1 problems found, 2 bad input (unreadable file, unknown layout, …).
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "common.hpp"
#include "lycoris/error.hpp"
#include "lycoris/tools/check.hpp"

namespace lycoris::cli {

void register_check(CLI::App& app) {
  struct Args {
    std::string adapter, base, base_format = "auto";
    bool json = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("check", "does an adapter fit a base checkpoint? (names, shapes, NaN/Inf, loader quirks)");
  cmd->add_option("adapter", args->adapter, "adapter file (.safetensors; lycoris, kohya or peft naming)")->required();
  cmd->add_option("--base", args->base, "base checkpoint (.safetensors) or TorchScript model (.pt)")->required();
  cmd->add_option("--base-format", args->base_format, "layout of --base: auto|diffusers|ldm")->capture_default_str();
  cmd->add_flag("--json", args->json, "JSON report on stdout");
  cmd->callback([args] {
    auto& a = *args;
    tools::CheckReport r;
    try {
      r = tools::check(a.adapter, a.base, naming::parse_base_format(a.base_format));
    } catch (const Error& e) {
      print_error(e.what());
      throw CLI::RuntimeError(2);
    }
    std::cout << (a.json ? r.json() + "\n" : r.text());
    if (r.problems() > 0) throw CLI::RuntimeError(1);
  });
}

}  // namespace lycoris::cli
