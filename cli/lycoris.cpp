// The `lycoris` command line tool. Subcommands: cli/<name>.cpp, listed in commands.hpp.
// Every error becomes one line on stderr and a non-zero exit: 2 for a usage error (unknown option or
// command, a missing or malformed value), 1 for bad input or a failure (`check`: 1 = problems found,
// 2 = bad input).
#include <CLI/CLI.hpp>
#include <torch/version.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>

#include "commands.hpp"
#include "common.hpp"
#include "exec/prefault_allocator.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/text.hpp"
#include "lycoris/version.hpp"

namespace {

constexpr const char* kCommands[] = {"info", "merge", "convert", "check", "extract", "resize"};

std::string command_list() {
  std::string out;
  for (const char* c : kCommands) out += (out.empty() ? "" : ", ") + std::string(c);
  return out;
}

int usage_error(const std::string& what, const std::string& command) {
  std::cerr << "lycoris: usage error: " << lycoris::escape_control(what) << " (see 'lycoris "
            << (command.empty() ? "" : command + " ") << "--help')\n";
  return 2;
}

int run(int argc, char** argv) {
  CLI::App app{"lycoris: inspect, merge, extract, resize and convert LyCORIS adapters"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("lycoris ") + LYCORIS_VERSION + " (libtorch " + TORCH_VERSION + ")");
  lycoris::cli::register_info(app);
  lycoris::cli::register_merge(app);
  lycoris::cli::register_convert(app);
  lycoris::cli::register_check(app);
  lycoris::cli::register_extract(app);
  lycoris::cli::register_resize(app);
  // The first word that is not an option must be a command: say which ones exist (CLI11 would only say
  // that the argument was not expected).
  if (argc > 1 && argv[1][0] != '-') {
    bool known = false;
    for (const char* c : kCommands) known = known || std::strcmp(argv[1], c) == 0;
    if (!known) return usage_error(std::string("unknown command '") + argv[1] + "' (commands: " + command_list() + ")", "");
  }
  std::string command;
  for (const auto* sub : app.get_subcommands()) command = sub->get_name();
  try {
    app.parse(argc, argv);
  } catch (const CLI::RuntimeError& e) {  // a command's own exit code, its report already printed
    return e.get_exit_code();
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    for (const auto* sub : app.get_subcommands()) command = sub->get_name();
    return usage_error(e.what(), command);
  } catch (const lycoris::cli::ExitCode& e) {
    return e.code;
  } catch (const lycoris::OptionError& e) {  // a bad option value, found by the command
    lycoris::cli::print_error(e.what());
    return 2;
  } catch (const std::exception& e) {
    lycoris::cli::print_error(e.what());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Over `ulimit -f` a write must fail with EFBIG (reported with the file's name), not kill the process.
  std::signal(SIGXFSZ, SIG_IGN);
  // Interrupted, no temporary output is left behind (the previous output is untouched anyway).
  lycoris::io::remove_temporaries_on_signals({SIGINT, SIGTERM, SIGHUP});
  // large tensors come already backed by memory: page faults dominate loading and temporaries on VMs
  lycoris::exec::use_prefault_allocator();
  const int code = run(argc, argv);
  // Every output is committed (fsync + rename) by now: skip the teardown of torch, the adapters and the
  // memory (0.1 s after a merge), as the OS reclaims all of it anyway.
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  std::_Exit(code);
}
