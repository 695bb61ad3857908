// Module naming (FORMAT.md §2): one home for every naming rule.
#pragma once
#include <string>
#include <vector>

namespace lycoris::naming {

// "<prefix>_<path with . → _>"; the root module (empty path) gives "<prefix>_".
std::string module_name(const std::string& prefix, const std::string& path);
// Prefixes the reference and kohya write: lycoris, lora_unet, lora_te, lora_te1, lora_te2, lora_te3.
const std::vector<std::string>& known_prefixes();

}  // namespace lycoris::naming
