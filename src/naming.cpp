#include "lycoris/naming.hpp"

#include <algorithm>

namespace lycoris::naming {

std::string module_name(const std::string& prefix, const std::string& path) {
  std::string p = path;
  std::replace(p.begin(), p.end(), '.', '_');
  return prefix + "_" + p;
}

const std::vector<std::string>& known_prefixes() {
  static const std::vector<std::string> prefixes = {"lycoris", "lora_unet", "lora_te", "lora_te1", "lora_te2",
                                                    "lora_te3"};
  return prefixes;
}

}  // namespace lycoris::naming
