// Grouping an adapter file's keys by module (docs/format.md: module = text before the first '.').
#include "lycoris/adapter_file.hpp"

#include "lycoris/text.hpp"

namespace lycoris {

std::map<std::string, TensorMap> group_modules(const io::SafetensorsFile& file, std::vector<std::string>* stray_keys) {
  std::map<std::string, TensorMap> modules;
  for (const auto& info : file.tensors()) {
    auto dot = info.name.find('.');
    if (dot == std::string::npos) {
      if (stray_keys) stray_keys->push_back(info.name);
      continue;
    }
    modules[info.name.substr(0, dot)].emplace(info.name.substr(dot + 1), file.tensor(info.name));
  }
  return modules;
}

std::string stray_keys_problem(const std::vector<std::string>& stray_keys) {
  std::vector<std::string> quoted;
  for (const auto& k : stray_keys) quoted.push_back("'" + k + "'");
  return std::to_string(stray_keys.size()) + " tensor(s) outside any module (an adapter's keys are "
         "'<module>.<name>'): " + join(quoted, ", ", 5);
}

std::string no_modules_problem(size_t tensors) {
  return tensors == 0 ? "holds no tensors: not an adapter, nothing to apply"
                      : "has no adapter module (" + std::to_string(tensors) +
                            " tensor(s), none named '<module>.<name>'): nothing to apply";
}

}  // namespace lycoris
