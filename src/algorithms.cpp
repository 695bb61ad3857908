// The algorithm registry: the only place that lists every algorithm. Each entry is defined next to
// its adapter module (src/modules/<algo>.cpp). Order = the reference's detection order (docs/format.md#detection).
#include "lycoris/algorithms.hpp"

#include <algorithm>
#include <cctype>

#include "lycoris/error.hpp"
#include "lycoris/text.hpp"

namespace lycoris {

Algorithm lora_algorithm();      // modules/lora.cpp   (LoRA/LoCon, also reads DyLoRA files)
Algorithm loha_algorithm();      // modules/loha.cpp
Algorithm ia3_algorithm();       // modules/ia3.cpp
Algorithm lokr_algorithm();      // modules/lokr.cpp
Algorithm full_algorithm();      // modules/full.cpp
Algorithm norm_algorithm();      // modules/norm.cpp
Algorithm diag_oft_algorithm();  // modules/diag_oft.cpp
Algorithm boft_algorithm();      // modules/boft.cpp
Algorithm glora_algorithm();     // modules/glora.cpp
Algorithm dylora_algorithm();    // modules/dylora.cpp (never detected: its files are LoRA files)
Algorithm glokr_algorithm();     // modules/glokr.cpp  (ours: docs/glokr.md)

const std::vector<Algorithm>& algorithms() {
  static const std::vector<Algorithm> all = {
      lora_algorithm(), loha_algorithm(),     ia3_algorithm(),  lokr_algorithm(),  full_algorithm(),
      norm_algorithm(), diag_oft_algorithm(), boft_algorithm(), glora_algorithm(), dylora_algorithm(),
      glokr_algorithm(),
  };
  return all;
}

const Algorithm& find_algorithm(const std::string& name) {
  std::string key = name;  // names are case-insensitive: "LoKr" is "lokr"
  std::transform(key.begin(), key.end(), key.begin(), [](unsigned char c) { return std::tolower(c); });
  std::string known;
  for (const auto& a : algorithms()) {
    if (a.name == key) return a;
    for (const auto& alias : a.aliases)
      if (alias == key) return a;
    known += (known.empty() ? "" : ", ") + a.name;
    if (!a.aliases.empty()) known += " (also " + join(a.aliases, ", ") + ")";
  }
  throw OptionError("unknown algorithm '" + escape_control(name) + "' (known: " + known + ")");
}

const Algorithm* detect_algorithm(const TensorMap& module_tensors) {
  for (const auto& a : algorithms())
    if (a.detect && a.detect(module_tensors)) return &a;
  return nullptr;
}

AdapterPtr load_adapter(const std::string& module, const TensorMap& module_tensors, const LayerSpec& layer) {
  const Algorithm* a = detect_algorithm(module_tensors);
  if (!a) {
    std::string keys;
    for (const auto& kv : module_tensors) keys += (keys.empty() ? "" : ", ") + kv.first;
    throw KeyError(module + ": no known algorithm for keys {" + keys + "}");
  }
  return a->load(module, module_tensors, layer);
}

}  // namespace lycoris
