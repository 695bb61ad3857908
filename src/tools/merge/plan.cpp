#include "tools/merge/plan.hpp"

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/io/dtype.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/version.hpp"

namespace lycoris::tools {

namespace {

// The steps of module `m` of adapter `i` at weight `w`: on its layer's weight, and bias when the layer has
// one. False when the module cannot apply (fused bias of an unexpected shape, allow_unmatched).
bool plan_module(MergePlan& plan, size_t i, const AdapterModule& m, double w, const MergeOptions& options,
                 const std::map<std::string, std::vector<int64_t>>& shapes,
                 const std::function<void(const std::string&)>& warn) {
  const auto& layer = m.target.layer;
  const auto& path = plan.adapters[i].path;
  // A module on a row block of a fused tensor (OpenCLIP's q/k/v in attn.in_proj_weight, naming.hpp: rows
  // [part·R/parts, (part+1)·R/parts)) merges into those rows of the weight and of the bias — the weight it
  // would see as a separate q/k/v layer (as ComfyUI and sd-webui apply it).
  int64_t r0 = 0, r1 = -1;
  if (layer.fused()) {
    const int64_t R = shapes.at(layer.weight_key).at(0);  // divisible by parts: checked by the loader
    r0 = layer.part * (R / layer.parts);
    r1 = r0 + R / layer.parts;
    if (!layer.bias_key.empty() && shapes.at(layer.bias_key) != std::vector<int64_t>{R}) {
      const std::string why = path + ": " + m.name + ": fused bias " + layer.bias_key + " has shape " +
                              functional::shape_str(shapes.at(layer.bias_key)) + ", expected [" + std::to_string(R) +
                              "] (the rows of " + layer.weight_key + ")";
      if (!options.allow_unmatched) throw ShapeError(why);
      warn("skipped " + why);
      return false;
    }
  }
  plan.steps[layer.weight_key].push_back({&m, i, {m.adapter.get(), w, false, r0, r1}});
  if (!layer.bias_key.empty())
    plan.steps[layer.bias_key].push_back({&m, i, {m.adapter.get(), w, true, r0, r1}});
  else if (m.adapter->changes_bias())
    warn(path + ": " + m.name + ": bias delta dropped (base has no " +
         (layer.path.empty() ? std::string("bias") : layer.path + ".bias") + ")");
  return true;
}

}  // namespace

MergePlan plan_merge(const MergeOptions& options, const naming::Resolver& names,
                     const std::map<std::string, std::vector<int64_t>>& shapes,
                     const std::function<void(const std::string&)>& warn) {
  MergePlan plan;
  AdapterLoadOptions load_options;
  load_options.allow_unmatched = options.allow_unmatched;
  load_options.device = options.device;
  for (const auto& in : options.adapters) {
    if (!std::isfinite(in.weight)) throw OptionError(in.path + ": weight must be finite");
    plan.adapters.push_back(load_adapter_for_base(io::SafetensorsFile::open(in.path), names, shapes, load_options));
    for (const auto& w : plan.adapters.back().warnings) warn(w);
    plan.modules_applied.push_back(plan.adapters.back().modules.size());
  }
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < plan.adapters.size(); ++i)
    for (const auto& m : plan.adapters[i].modules)
      if (!plan_module(plan, i, m, options.adapters[i].weight, options, shapes, warn)) --plan.modules_applied[i];
  return plan;
}

std::string dtype_label(const std::optional<torch::ScalarType>& dtype) {
  return dtype ? io::dtype_name(io::from_torch(*dtype)) : "keep";
}

std::string merge_record(const std::vector<MergeInput>& adapters, const std::optional<torch::ScalarType>& dtype,
                         const std::string& previous) {
  nlohmann::json j;
  j["tool"] = std::string("lycoris-cpp ") + LYCORIS_VERSION;
  j["adapters"] = nlohmann::json::array();
  for (const auto& a : adapters)
    j["adapters"].push_back({{"file", std::filesystem::path(a.path).filename().string()}, {"weight", a.weight}});
  j["dtype"] = dtype_label(dtype);
  if (!previous.empty()) {
    auto prev = nlohmann::json::parse(previous, nullptr, false);
    j["previous"] = prev.is_discarded() ? nlohmann::json(previous) : prev;
  }
  return j.dump();
}

}  // namespace lycoris::tools
