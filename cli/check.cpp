// `lycoris check ADAPTER --base BASE [--json] [--base-format auto|diffusers|ldm]`
// `lycoris check ADAPTER [--base BASE] --loader comfyui|sdwebui|sdcpp|kohya|peft|lycoris-py [--json]`
// Exit code: 0 clean (with --loader: every module applied exactly at every strength), 1 problems found (a module
// the loader misapplies, refuses or ignores), 2 bad input (unreadable file, unknown layout or loader, …).
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "common.hpp"
#include "lycoris/error.hpp"
#include "lycoris/tools/check.hpp"
#include "lycoris/tools/check_loader.hpp"

namespace lycoris::cli {

void register_check(CLI::App& app) {
  struct Args {
    std::string adapter, base, base_format = "auto", loader;
    bool json = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("check", "does an adapter fit a base checkpoint? (names, shapes, NaN/Inf, loader quirks)");
  cmd->add_option("adapter", args->adapter, "adapter file (.safetensors; lycoris, kohya or peft naming)")->required();
  cmd->add_option("--base", args->base,
                  "base checkpoint (.safetensors) or TorchScript model (.pt); optional with --loader");
  cmd->add_option("--loader", args->loader,
                  "what one program does with each module: comfyui|sdwebui|sdcpp|kohya|peft|lycoris-py");
  cmd->add_option("--base-format", args->base_format, "layout of --base: auto|diffusers|ldm")->capture_default_str();
  cmd->add_flag("--json", args->json, "JSON report on stdout");
  cmd->callback([args] {
    auto& a = *args;
    if (!a.loader.empty()) {
      tools::LoaderCheckReport r;
      try {
        r = tools::check_loader(a.adapter, a.loader, a.base, naming::parse_base_format(a.base_format));
      } catch (const Error& e) {
        print_error(e.what());
        throw CLI::RuntimeError(2);
      }
      std::cout << (a.json ? r.json() + "\n" : r.text());
      if (!r.exact()) throw CLI::RuntimeError(1);
      return;
    }
    if (a.base.empty()) {
      print_error("check: --base is required (unless --loader is given)");
      throw CLI::RuntimeError(2);
    }
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
