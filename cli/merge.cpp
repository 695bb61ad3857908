// `lycoris merge` (placeholder until its issue lands)
#include "commands.hpp"
#include "lycoris/error.hpp"

namespace lycoris::cli {
void register_merge(CLI::App& app) {
  auto* cmd = app.add_subcommand("merge", "not implemented yet");
  cmd->callback([] { throw lycoris::Error("merge: not implemented yet"); });
}
}  // namespace lycoris::cli
