// The algorithm registry: the only place that lists every algorithm (src/algorithms.cpp).
#pragma once
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "lycoris/adapter.hpp"

namespace lycoris {

// Facts about one module of a file that decide how other programs read it ("tucker", "dora-out", "conv1d", ...;
// known_traits() lists and explains every name). The per-loader rule tables (tools/loader_rules.hpp,
// docs/loaders.md#matrix) match on them: the registry says what a module is, the tables what each loader does
// with it.
using Traits = std::vector<std::string>;

// A module in PEFT's form (`convert --to peft`): the same suffixes, in PEFT's shapes, with the LyCORIS scale
// folded into one factor (PEFT files carry no alpha); or the reason PEFT cannot express the module.
struct PeftForm {
  std::string refusal;  // "" = expressible
  NamedTensors tensors;
};

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
  // The options (keys of LYCORIS_MODULE_OPTIONS, options.hpp) it reads besides rank, alpha and the ones every
  // module reads; setting another one warns (docs/training.md#option-checks).
  std::vector<std::string> options;
  // The module's traits (names from known_traits(); the layer kind when the stored shapes show it). Throws
  // lycoris::Error when a value it needs is unreadable (the loader reports the same module as malformed).
  std::function<Traits(const std::string& module, const TensorMap&)> traits;
  // PEFT's form of a module at LyCORIS scale `scale` (null: PEFT has no such adapter, `peft_refusal` says why).
  std::function<PeftForm(const TensorMap&, double scale)> to_peft;
  // A module read from a PEFT file (LyCORIS suffixes, PEFT shapes, no alpha) made a LyCORIS module at PEFT
  // scale `scale` (lora_alpha / r): shapes restored and alpha made explicit (or folded when it is not read).
  std::function<void(TensorMap&, double scale)> from_peft;
  std::string peft_refusal;
};

// Every trait name an algorithm's `traits` may report, with its meaning: (name, meaning).
const std::vector<std::pair<std::string, std::string>>& known_traits();
// The layer-kind trait of a weight with `dims` dimensions: "linear", "conv1d", "conv2d", "conv3d" ("" otherwise).
std::string layer_kind_trait(int64_t dims);

// All algorithms, in detection order.
const std::vector<Algorithm>& algorithms();
// By name or alias; OptionError listing the known names if unknown.
const Algorithm& find_algorithm(const std::string& name);
// The first algorithm whose marker is present, or nullptr.
const Algorithm* detect_algorithm(const TensorMap& module_tensors);
// detect + load; KeyError listing the module's keys when no algorithm matches.
AdapterPtr load_adapter(const std::string& module, const TensorMap& module_tensors, const LayerSpec& layer);

}  // namespace lycoris
