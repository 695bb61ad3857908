// The plan of a merge: every adapter loaded against the base, and per base tensor the steps that change it.
#pragma once
#include <torch/types.h>

#include <cstddef>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "lycoris/adapter_file.hpp"
#include "lycoris/naming.hpp"
#include "lycoris/tools/merge.hpp"
#include "tools/merge/merge_tensor.hpp"

namespace lycoris::tools {

// One adapter module applied to one base tensor.
struct PlannedStep {
  const AdapterModule* module;
  size_t adapter;  // index in MergeOptions::adapters
  MergeStep step;  // the adapter at its weight, weight or bias, and the rows (fused q/k/v) it applies to
};

struct MergePlan {
  std::vector<LoadedAdapter> adapters;  // as MergeOptions::adapters
  std::vector<size_t> modules_applied;  // per adapter
  // base key → its steps, adapters in order
  std::unordered_map<std::string, std::vector<PlannedStep>> steps;

  bool touches(const std::string& key) const { return steps.count(key) > 0; }
};

// Loads every adapter of `options` against the base (its key → shape table and names) and plans the steps
// of every base tensor. A module on a fused tensor's row block (OpenCLIP q/k/v) merges into those rows of the
// weight and of the bias; a bias delta for a layer without bias is dropped with a warning (the checkpoint
// has no key for it, and adding one would break loading the model strictly). Warnings go to `warn`.
MergePlan plan_merge(const MergeOptions& options, const naming::Resolver& names,
                     const std::map<std::string, std::vector<int64_t>>& shapes,
                     const std::function<void(const std::string&)>& warn);

// The output dtype as named in messages and in the merge record: its name, or "keep".
std::string dtype_label(const std::optional<torch::ScalarType>& dtype);

// The JSON recorded under the output metadata key "lycoris_merge": the tool, the adapters (file names and
// weights), the output dtype and the `previous` record of the base, if any.
std::string merge_record(const std::vector<MergeInput>& adapters, const std::optional<torch::ScalarType>& dtype,
                         const std::string& previous);

}  // namespace lycoris::tools
