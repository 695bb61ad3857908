// Each subcommand lives in cli/<name>.cpp and registers itself on the app.
#pragma once
#include <CLI/CLI.hpp>

namespace lycoris::cli {

// Thrown by a command that has already reported its errors: main exits with `code`, printing nothing.
struct ExitCode {
  int code;
};

void register_info(CLI::App& app);   // cli/info.cpp
void register_merge(CLI::App& app);  // cli/merge.cpp
void register_convert(CLI::App& app);  // cli/convert.cpp
void register_check(CLI::App& app);    // cli/check.cpp
void register_extract(CLI::App& app);  // cli/extract.cpp
void register_resize(CLI::App& app);   // cli/resize.cpp

}  // namespace lycoris::cli
