// `lycoris info` (placeholder until its issue lands)
#include "commands.hpp"
#include "lycoris/error.hpp"

namespace lycoris::cli {
void register_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "not implemented yet");
  cmd->callback([] { throw lycoris::Error("info: not implemented yet"); });
}
}  // namespace lycoris::cli
