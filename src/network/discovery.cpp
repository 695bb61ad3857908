// Module discovery and naming of the generic network (docs/training.md#discovery): which layers get which adapter.
#include <torch/torch.h>

#include <set>
#include <unordered_set>

#include "internal.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/naming.hpp"

namespace lycoris {

std::string module_type_name(const std::string& demangled) {
  // strip the namespace (the last "::" outside template arguments), then a trailing "Impl"
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i + 1 < demangled.size(); ++i) {
    const char c = demangled[i];
    if (c == '<') ++depth;
    if (c == '>') --depth;
    if (depth == 0 && c == ':' && demangled[i + 1] == ':') start = i + 2;
  }
  std::string name = demangled.substr(start);
  if (name.size() > 4 && name.compare(name.size() - 4, 4, "Impl") == 0) name.resize(name.size() - 4);
  return name;
}

std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> named_modules_preorder(
    const std::shared_ptr<torch::nn::Module>& model) {
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> out;
  std::unordered_set<const torch::nn::Module*> seen;
  std::function<void(const std::string&, const std::shared_ptr<torch::nn::Module>&)> visit =
      [&](const std::string& path, const std::shared_ptr<torch::nn::Module>& m) {
        if (!seen.insert(m.get()).second) return;
        out.emplace_back(path, m);
        for (const auto& child : m->named_children())
          visit(path.empty() ? child.key() : path + "." + child.key(), child.value());
      };
  visit("", model);
  return out;
}

namespace {

template <typename Array>
std::vector<int64_t> to_vec(const Array& a) {
  return std::vector<int64_t>(a->begin(), a->end());
}

template <size_t D, typename Impl>
bool conv_spec(const torch::nn::Module& module, LayerSpec& out, std::string* why) {
  const auto* conv = dynamic_cast<const Impl*>(&module);
  if (!conv) return false;
  const auto& o = conv->options;
  auto kernel = to_vec(o.kernel_size()), dilation = to_vec(o.dilation());
  std::vector<int64_t> padding;
  if (const auto* p = c10::get_if<torch::ExpandingArray<D>>(&o.padding())) {
    padding = to_vec(*p);
  } else if (c10::get_if<torch::enumtype::kValid>(&o.padding())) {
    padding.assign(D, 0);
  } else {  // "same": symmetric only when dilation·(k−1) is even
    for (size_t i = 0; i < D; ++i) {
      const int64_t total = dilation[i] * (kernel[i] - 1);
      if (total % 2) {
        if (why) *why = module.name() + " with padding 'same' and an even kernel (asymmetric padding)";
        return false;
      }
      padding.push_back(total / 2);
    }
  }
  out = LayerSpec::conv(o.in_channels(), o.out_channels(), kernel, to_vec(o.stride()), padding, dilation, o.groups(),
                        conv->bias.defined());
  return true;
}

}  // namespace

bool layer_spec_of(const torch::nn::Module& module, LayerSpec& out, std::string* why) {
  if (const auto* l = dynamic_cast<const torch::nn::LinearImpl*>(&module)) {
    out = LayerSpec::linear(l->options.in_features(), l->options.out_features(), l->bias.defined());
    return true;
  }
  if (conv_spec<1, torch::nn::Conv1dImpl>(module, out, why) || conv_spec<2, torch::nn::Conv2dImpl>(module, out, why) ||
      conv_spec<3, torch::nn::Conv3dImpl>(module, out, why))
    return true;
  if (const auto* n = dynamic_cast<const torch::nn::LayerNormImpl*>(&module)) {
    if (!n->options.elementwise_affine() || n->options.normalized_shape().size() != 1) {
      if (why) *why = "LayerNorm without elementwise affine weights over exactly one axis";
      return false;
    }
    out = LayerSpec::layer_norm(n->options.normalized_shape()[0], n->options.eps(), n->bias.defined());
    return true;
  }
  if (const auto* g = dynamic_cast<const torch::nn::GroupNormImpl*>(&module)) {
    if (!g->options.affine()) {
      if (why) *why = "GroupNorm without affine weights";
      return false;
    }
    out = LayerSpec::group_norm(g->options.num_groups(), g->options.num_channels(), g->options.eps(),
                                g->bias.defined());
    return true;
  }
  return false;
}

namespace detail {

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

  std::vector<NetworkModule> run(const std::shared_ptr<torch::nn::Module>& model) {
    for (const auto& [path, layer] : named_modules_preorder(model)) {
      if (excluded(path)) continue;
      const std::string cls = module_type_name(layer->name());
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
  void walk(const std::string& root_path, const std::shared_ptr<torch::nn::Module>& root, const std::string& algo,
            const ModuleOverride& cfg) {
    for (const auto& [sub, layer] : named_modules_preorder(root)) {
      const std::string path = sub.empty() ? root_path : root_path.empty() ? sub : root_path + "." + sub;
      if (!sub.empty()) {
        if (const auto* nested = find_entry(p_.module_algo_map, module_type_name(layer->name()))) {
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

  void create_single(const std::string& path, const std::shared_ptr<torch::nn::Module>& layer, const std::string& algo,
                     const ModuleOverride& cfg) {
    const std::string name = naming::module_name(p_.lora_prefix, path);
    if (names_.count(name)) return;
    const std::string cls = module_type_name(layer->name());
    LayerSpec spec;
    std::string why;
    const bool supported = layer_spec_of(*layer, spec, &why);
    AdapterOptions opts = o_.module();
    opts.algo(algo);
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
    out_.push_back(NetworkModule{name, path, adapter->algo(), spec, layer, adapter});
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

std::vector<NetworkModule> discover(const std::shared_ptr<torch::nn::Module>& model, const NetworkOptions& options,
                                    std::vector<std::string>& warnings) {
  return Discovery(options, warnings).run(model);
}

}  // namespace detail
}  // namespace lycoris
