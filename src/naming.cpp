#include "lycoris/naming.hpp"

#include <algorithm>
#include <unordered_set>

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

std::vector<BaseLayer> base_layers(const std::vector<std::string>& keys) {
  static const std::string suffix = ".weight";
  std::unordered_set<std::string> all(keys.begin(), keys.end());
  std::vector<BaseLayer> layers;
  for (const auto& key : keys) {
    std::string path;
    if (key == "weight") {
      path = "";
    } else if (key.size() > suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0) {
      path = key.substr(0, key.size() - suffix.size());
    } else {
      continue;
    }
    const std::string bias = path.empty() ? "bias" : path + ".bias";
    layers.push_back({path, key, all.count(bias) ? bias : ""});
  }
  return layers;
}

const std::vector<Dialect>& dialects() {
  static const std::vector<Dialect> all = {
      // The reference's own rule (generic wrapper, kohya on diffusers/HF layouts, extract/merge tools).
      {"standalone",
       [](const std::vector<BaseLayer>& layers, const std::function<void(Resolution)>& emit) {
         for (const auto& layer : layers)
           for (const auto& prefix : known_prefixes())
             emit({module_name(prefix, layer.path), layer, "standalone", prefix});
       }},
  };
  return all;
}

Resolver::Resolver(const std::vector<std::string>& base_keys, const std::vector<Dialect>& rules)
    : layers_(base_layers(base_keys)) {
  for (const auto& rule : rules)
    rule.names(layers_, [&](Resolution r) {
      auto& list = by_name_[r.module];
      // the same layer reached twice (two rules agreeing) is one match, not an ambiguity
      for (const auto& existing : list)
        if (existing.layer.weight_key == r.layer.weight_key) return;
      list.push_back(std::move(r));
    });
}

std::vector<const Resolution*> Resolver::find(const std::string& module) const {
  std::vector<const Resolution*> out;
  auto it = by_name_.find(module);
  if (it != by_name_.end())
    for (const auto& r : it->second) out.push_back(&r);
  return out;
}

namespace {
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}
}  // namespace

std::vector<std::string> Resolver::closest(const std::string& module, size_t n) const {
  std::vector<std::pair<size_t, std::string>> scored;
  scored.reserve(by_name_.size());
  for (const auto& kv : by_name_) scored.emplace_back(edit_distance(module, kv.first), kv.first);
  const size_t k = std::min(n, scored.size());
  std::partial_sort(scored.begin(), scored.begin() + static_cast<std::ptrdiff_t>(k), scored.end());
  std::vector<std::string> out;
  for (size_t i = 0; i < k; ++i) out.push_back(scored[i].second);
  return out;
}

}  // namespace lycoris::naming
