// Adapter files seen as modules: keys "<module>.<suffix>" grouped by module (docs/format.md#module-names), and an
// adapter file loaded against a base checkpoint (module → base layer, algorithm, adapter).
#pragma once
#include <torch/types.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "lycoris/adapter.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"

namespace lycoris {

// module name (text before the first '.') → {suffix (the rest) → tensor (zero-copy view of the file)}.
// Keys without a '.' belong to no module: they are left out, and listed in `stray_keys` when it is given
// (the reference loaders ignore them silently; our tools name them).
std::map<std::string, TensorMap> group_modules(const io::SafetensorsFile& file,
                                               std::vector<std::string>* stray_keys = nullptr);

// The problems a tool reports about an adapter file as a whole (one line, without the file name):
// tensors that belong to no module, and a file with no module at all ("nothing to apply").
std::string stray_keys_problem(const std::vector<std::string>& stray_keys);
std::string no_modules_problem(size_t tensors);

// One module of an adapter file, resolved to a base layer and loaded.
struct AdapterModule {
  std::string name;            // module name in the file
  std::string algo;            // detected algorithm (registry name)
  naming::Resolution target;   // base layer it applies to, and through which naming rule
  LayerSpec layer;             // the host layer as seen by the adapter
  AdapterPtr adapter;          // loaded, in eval mode, on the requested device
};

struct LoadedAdapter {
  std::string path;
  std::vector<AdapterModule> modules;  // in module-name order
  std::vector<std::string> warnings;   // what allow_unmatched skipped: modules, stray keys (one line each)
};

struct AdapterLoadOptions {
  // Modules that match no base layer, or whose base layer has a shape they do not fit, are skipped with a
  // warning instead of failing the whole load.
  bool allow_unmatched = false;
  torch::Device device = torch::kCPU;
  // The host layer of a base layer; default LayerSpec::from_weight_shape(weight shape, has bias), which is
  // all merging needs (ΔW depends on shapes only). Tests pass the real stride/padding/eps here.
  std::function<LayerSpec(const naming::BaseLayer&, const std::vector<int64_t>& weight_shape, bool has_bias)>
      layer_spec;
};

// Loads every module of `adapter` against a base checkpoint given by its key → shape table:
// resolves each module name to a base layer (naming::Resolver), detects its algorithm (registry), builds
// the LayerSpec from the base weight's shape and loads it (which validates every stored shape).
// Errors (one message listing every offending module): a file with no module, a key set no algorithm
// recognises (module and its keys), a malformed module (missing/unknown key, inconsistent shapes), and —
// unless allow_unmatched — tensors outside any module, a module that matches no base layer (with the
// closest names) or matches one whose shape it does not fit.
LoadedAdapter load_adapter_for_base(const io::SafetensorsFile& adapter, const naming::Resolver& base_names,
                                    const std::map<std::string, std::vector<int64_t>>& base_shapes,
                                    const AdapterLoadOptions& options = {});
// Same, opening both files (only the base's header is read).
LoadedAdapter load_adapter_for_base(const std::string& adapter_path, const std::string& base_path,
                                    const AdapterLoadOptions& options = {});

}  // namespace lycoris
