// The `lycoris` command line tool. Subcommands: cli/<name>.cpp, listed in commands.hpp.
// Every error becomes one line on stderr and a non-zero exit.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>

#include "commands.hpp"
#include "lycoris/error.hpp"
#include "lycoris/tools/prefault_allocator.hpp"

namespace {

int run(int argc, char** argv) {
  CLI::App app{"lycoris: inspect, merge, extract, resize and convert LyCORIS adapters"};
  app.require_subcommand(1);
  lycoris::cli::register_info(app);
  lycoris::cli::register_merge(app);
  lycoris::cli::register_convert(app);
  lycoris::cli::register_check(app);
  lycoris::cli::register_extract(app);
  lycoris::cli::register_resize(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const lycoris::cli::ExitCode& e) {
    return e.code;
  } catch (const lycoris::Error& e) {
    std::cerr << "lycoris: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "lycoris: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // large tensors come already backed by memory: page faults dominate loading and temporaries on VMs
  lycoris::tools::use_prefault_allocator();
  const int code = run(argc, argv);
  // Every output is committed (fsync + rename) by now: skip the teardown of torch, the adapters and the
  // memory (0.1 s after a merge), as the OS reclaims all of it anyway.
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  std::_Exit(code);
}
