// Each subcommand lives in cli/<name>.cpp and registers itself on the app.
#pragma once
#include <CLI/CLI.hpp>

namespace lycoris::cli {

void register_info(CLI::App& app);   // cli/info.cpp
void register_merge(CLI::App& app);  // cli/merge.cpp

}  // namespace lycoris::cli
