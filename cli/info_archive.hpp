// `lycoris info model.pt`: a TorchScript archive as a network would see it (cli/info_archive.cpp).
#pragma once
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

namespace lycoris::cli {

// The archive's parameters and, per module the host view (lycoris/jit.hpp) adapts, its path, class and
// layer; modules of a layer kind it skips with the reason. Its JSON object is appended to `objects`, or its
// text section written to `os`.
void describe_archive(const std::string& path, bool as_json, std::vector<nlohmann::ordered_json>& objects,
                      std::ostream& os);

}  // namespace lycoris::cli
