// The algorithm registry: the only place that lists every algorithm (src/algorithms.cpp).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "lycoris/adapter.hpp"

namespace lycoris {

struct Algorithm {
  std::string name;                  // canonical name: "lora", "loha", "lokr", ...
  std::vector<std::string> aliases;  // e.g. "locon" for "lora", "oft" → "diag-oft"
  // Every suffix this algorithm's files may contain (marker first), for unknown-key errors and `info`.
  std::vector<std::string> suffixes;
  // True when a module's tensors carry this algorithm's marker (docs/format.md#detection; tried in registry order).
  std::function<bool(const TensorMap&)> detect;
  // Builds the adapter from a file's module tensors; the layout comes from the stored shapes.
  // Throws ShapeError / KeyError naming `module`, the key and the reason.
  std::function<AdapterPtr(const std::string& module, const TensorMap&, const LayerSpec&)> load;
  // A freshly initialised adapter for training (reference initialisation). Throws OptionError.
  std::function<AdapterPtr(const LayerSpec&, const AdapterOptions&)> create;
  // Rank read from a module's stored shapes (0 when the algorithm has none), for `info`.
  std::function<int64_t(const TensorMap&)> rank;
  // Which layer kinds it can wrap.
  std::function<bool(const LayerSpec&)> supports;
};

// All algorithms, in detection order.
const std::vector<Algorithm>& algorithms();
// By name or alias; OptionError listing the known names if unknown.
const Algorithm& find_algorithm(const std::string& name);
// The first algorithm whose marker is present, or nullptr.
const Algorithm* detect_algorithm(const TensorMap& module_tensors);
// detect + load; KeyError listing the module's keys when no algorithm matches.
AdapterPtr load_adapter(const std::string& module, const TensorMap& module_tensors, const LayerSpec& layer);

}  // namespace lycoris
