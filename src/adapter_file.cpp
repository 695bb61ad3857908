// Grouping an adapter file's keys by module (FORMAT.md §1: module = text before the first '.').
#include "lycoris/adapter_file.hpp"

namespace lycoris {

std::map<std::string, TensorMap> group_modules(const io::SafetensorsFile& file) {
  std::map<std::string, TensorMap> modules;
  for (const auto& info : file.tensors()) {
    auto dot = info.name.find('.');
    if (dot == std::string::npos) continue;
    modules[info.name.substr(0, dot)].emplace(info.name.substr(dot + 1), file.tensor(info.name));
  }
  return modules;
}

}  // namespace lycoris
