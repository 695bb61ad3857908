// Module discovery and naming of the generic network (docs/training.md#discovery): which layers get which adapter.
#include <torch/torch.h>

#include <set>

#include "internal.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/naming.hpp"

namespace lycoris::detail {

namespace {

const ModuleOverride* find_entry(const OverrideMap& map, const std::string& key) {
  for (const auto& kv : map)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

class Discovery {
 public:
  Discovery(const NetworkOptions& o, std::vector<std::string>& warnings) : o_(o), p_(o.preset()), warnings_(warnings) {
    tm_ = p_.target_module;
    for (const auto& kv : p_.module_algo_map) tm_.push_back(kv.first);
    tn_ = p_.target_name;
    for (const auto& kv : p_.name_algo_map) tn_.push_back(kv.first);
    for (const auto& kv : p_.module_algo_map) kv.second.validate("module_algo_map." + kv.first);
    for (const auto& kv : p_.name_algo_map) kv.second.validate("name_algo_map." + kv.first);
    lora_dim_ = o.linear_dim();
    alpha_ = o.linear_alpha();
    conv_dim_ = p_.enable_conv ? (o.conv_dim() ? o.conv_dim() : o.linear_dim()) : 0;
    conv_alpha_ = o.conv_alpha() != 0.0 ? o.conv_alpha() : o.linear_alpha();
    algo_ = o.module().algo().empty() ? "lora" : o.module().algo();
    find_algorithm(algo_);  // unknown algorithm: OptionError before anything is created
  }

  std::vector<NetworkModule> run(const HostModulePtr& model) {
    for (const auto& [path, layer] : preorder(model)) {
      if (excluded(path)) continue;
      const std::string cls = layer->type_name();
      const bool class_target = std::find(tm_.begin(), tm_.end(), cls) != tm_.end();
      const bool name_target = matches_any(tn_, path);
      if (class_target && !name_target) {
        const ModuleOverride* cfg = find_entry(p_.module_algo_map, cls);
        walk(path, layer, cfg && !cfg->algo().empty() ? cfg->algo() : algo_, cfg ? *cfg : ModuleOverride());
      } else if (name_target) {
        const ModuleOverride* cfg = name_entry(path);
        if (!cfg) cfg = find_entry(p_.module_algo_map, cls);
        create_single(path, layer, cfg && !cfg->algo().empty() ? cfg->algo() : algo_, cfg ? *cfg : ModuleOverride());
      }
    }
    return std::move(out_);
  }

 private:
  bool matches_any(const std::vector<std::string>& patterns, const std::string& path) const {
    for (const auto& pat : patterns)
      if (pat == path || name_matches(pat, path, p_.use_fnmatch)) return true;
    return false;
  }
  bool excluded(const std::string& path) const { return matches_any(p_.exclude_name, path); }
  // The name_algo_map entry of a path: exact key first, else the first key pattern that matches.
  const ModuleOverride* name_entry(const std::string& path) const {
    if (const auto* e = find_entry(p_.name_algo_map, path)) return e;
    for (const auto& kv : p_.name_algo_map)
      if (name_matches(kv.first, path, p_.use_fnmatch)) return &kv.second;
    return nullptr;
  }

  // Every layer inside a class target (root included); nested module_algo_map classes start their own walk.
  void walk(const std::string& root_path, const HostModulePtr& root, const std::string& algo,
            const ModuleOverride& cfg) {
    for (const auto& [sub, layer] : preorder(root)) {
      const std::string path = sub.empty() ? root_path : root_path.empty() ? sub : root_path + "." + sub;
      if (!sub.empty()) {
        if (const auto* nested = find_entry(p_.module_algo_map, layer->type_name())) {
          walk(path, layer, nested->algo().empty() ? algo : nested->algo(), *nested);
          continue;
        }
      }
      if (!p_.container_quirk && !sub.empty()) {  // docs/loaders.md#q33-container-exclusions fixed: exclusions and name overrides apply inside
        if (excluded(path)) continue;
        if (const auto* e = name_entry(path)) {
          create_single(path, layer, e->algo().empty() ? algo : e->algo(), *e);
          continue;
        }
      }
      create_single(path, layer, algo, cfg);
    }
  }

  void create_single(const std::string& path, const HostModulePtr& module, const std::string& algo,
                     const ModuleOverride& cfg) {
    const std::string name = naming::module_name(p_.lora_prefix, path);
    if (names_.count(name)) return;
    const std::string cls = module->type_name();
    std::string why;
    const HostLayerPtr view = module->layer(&why);
    const bool supported = view != nullptr;
    const LayerSpec spec = supported ? view->spec() : LayerSpec();
    AdapterOptions opts = o_.module();
    opts.algo(find_algorithm(algo).name);
    int64_t rank = 0;
    double alpha = 0;
    if (o_.train_norm() && cls.find("Norm") != std::string::npos) {
      if (!supported || !spec.is_norm()) {
        if (!warned_.insert(path).second) return;
        warnings_.push_back(name + ": " + cls + " at '" + path + "' skipped (" +
                            (why.empty() ? "not a LayerNorm/GroupNorm" : why) + ")");
        return;
      }
      opts.algo("norm");
    } else if (!supported || spec.is_norm()) {
      if (!why.empty() && warned_.insert(path).second)
        warnings_.push_back(name + ": layer at '" + path + "' skipped (" + why + ")");
      return;
    } else if (spec.kind == LayerKind::Linear || (spec.kernel.at(0) == 1 && lora_dim_ > 0)) {
      if (lora_dim_ <= 0) return;
      rank = cfg.dim() ? cfg.dim() : lora_dim_;
      alpha = cfg.alpha() != 0.0 ? cfg.alpha() : alpha_;
    } else if (conv_dim_ > 0 || cfg.dim()) {
      rank = cfg.dim() ? cfg.dim() : conv_dim_;
      alpha = cfg.alpha() != 0.0 ? cfg.alpha() : conv_alpha_;
    } else {
      return;
    }
    const std::string where = name + " (" + spec.describe() + ")";
    cfg.apply_to(opts, where);
    if (rank > 0) opts.rank(rank).alpha(alpha);
    AdapterPtr adapter;
    try {
      adapter = find_algorithm(opts.algo()).create(spec, opts);
    } catch (const Error& e) {
      throw OptionError(where + ": " + e.what());
    }
    names_.insert(name);
    out_.push_back(NetworkModule{name, path, adapter->algo(), spec, module->torch_module(), adapter, view});
  }

  const NetworkOptions& o_;
  const Preset& p_;
  std::vector<std::string>& warnings_;
  std::vector<std::string> tm_, tn_;
  int64_t lora_dim_ = 0, conv_dim_ = 0;
  double alpha_ = 0, conv_alpha_ = 0;
  std::string algo_;
  std::set<std::string> names_, warned_;
  std::vector<NetworkModule> out_;
};

}  // namespace

std::vector<NetworkModule> discover(const HostModulePtr& model, const NetworkOptions& options,
                                    std::vector<std::string>& warnings) {
  return Discovery(options, warnings).run(model);
}

}  // namespace lycoris::detail
