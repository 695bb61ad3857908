// LycorisNetwork: create, apply/restore/merge, save, and rebuild from a file (network.hpp, docs/training.md).
#include "lycoris/network.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "module_fit.hpp"
#include "internal.hpp"
#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"
#include "lycoris/nn/layers.hpp"
#include "lycoris/text.hpp"
#include "lycoris/version.hpp"

namespace lycoris {

struct LycorisNetworkImpl::State {
  double multiplier = 1.0;
  detail::GeneratorStates rng;  // rng_before_refresh()
};

namespace {

void check_network_options(const NetworkOptions& o) {
  if (!std::isfinite(o.multiplier())) throw OptionError("network multiplier must be finite");
  if (o.linear_dim() < 0) throw OptionError("linear_dim must be >= 0, got " + std::to_string(o.linear_dim()));
  if (o.conv_dim() < 0) throw OptionError("conv_dim must be >= 0, got " + std::to_string(o.conv_dim()));
  // one place per value: a network's ranks and alphas are its dims (network.hpp)
  const AdapterOptions d;
  if (o.module().rank() != d.rank())
    throw OptionError("NetworkOptions.module().rank(" + std::to_string(o.module().rank()) +
                      ") is not used by a network: set linear_dim (Linear layers and 1x1 convs) and conv_dim (other "
                      "convs) instead, or dim per module in a preset");
  if (o.module().alpha() != d.alpha())
    throw OptionError("NetworkOptions.module().alpha(" + c10::str(o.module().alpha()) +
                      ") is not used by a network: set linear_alpha and conv_alpha instead, or alpha per module in a preset");
}

// Why nothing was adapted: the preset's targets and a few of the model's layers.
std::string nothing_matched(const HostModulePtr& model, const NetworkOptions& o) {
  const Preset& p = o.preset();
  std::vector<std::string> layers;
  size_t total = 0;
  for (const auto& [path, node] : preorder(model)) {
    if (path.empty()) continue;
    if (++total <= 8) layers.push_back("'" + path + "' (" + node->type_name() + ")");
  }
  std::string why = "create_lycoris: no layer of the model was adapted (preset '" + p.name + "': target_module [" +
                    join(p.target_module, ", ", 12) + "], target_name [" + join(p.target_name, ", ", 12) + "]";
  if (!p.exclude_name.empty()) why += ", exclude_name [" + join(p.exclude_name, ", ", 12) + "]";
  if (o.linear_dim() == 0) why += ", linear_dim 0";
  why += "); the model has " + std::to_string(total) + " submodule(s)";
  if (!layers.empty()) why += ": " + join(layers, ", ") + (total > layers.size() ? ", …" : "");
  return why + ". Use a preset whose targets name these classes or paths, or NetworkOptions().allow_empty(true) for a "
               "deliberately empty network";
}

nlohmann::json options_json(const NetworkOptions& n) {
  const auto& o = n.module();
  nlohmann::json j = {{"algo", o.algo()},
                      {"multiplier", n.multiplier()},
                      {"linear_dim", n.linear_dim()},
                      {"linear_alpha", n.linear_alpha()},
                      {"conv_dim", n.conv_dim()},
                      {"conv_alpha", n.conv_alpha()},
                      {"train_norm", n.train_norm()},
                      {"preset", n.preset().name}};
#define LYCORIS_OPTION_JSON(type, field, init, key, aliases, scope) j[key] = o.field();
  LYCORIS_MODULE_OPTIONS(LYCORIS_OPTION_JSON)
#undef LYCORIS_OPTION_JSON
  return j;
}

}  // namespace

LycorisNetworkImpl::LycorisNetworkImpl(std::shared_ptr<torch::nn::Module> model, NetworkOptions options)
    : LycorisNetworkImpl(model ? host_module(std::move(model)) : nullptr, std::move(options)) {}

LycorisNetworkImpl::LycorisNetworkImpl(HostModulePtr model, NetworkOptions options)
    : model_(std::move(model)), options_(std::move(options)), state_(std::make_shared<State>()) {
  if (!model_) throw OptionError("create_lycoris: no model");
  check_network_options(options_);
  // algorithm names are case-insensitive and have aliases: the canonical one from here on (metadata, modules)
  if (!options_.module().algo().empty()) options_.module().algo(find_algorithm(options_.module().algo()).name);
  state_->multiplier = options_.multiplier();
  for (auto& m : detail::discover(model_, options_, warnings_)) add_module_(std::move(m));
  if (modules_.empty() && !options_.allow_empty()) throw OptionError(nothing_matched(model_, options_));
  // a bypass-mode module on a layer that cannot ask its adapters falls back to rebuild mode: say so now,
  // not only in warnings() after apply_to
  for (const auto& m : modules_)
    if (m.adapter->options().bypass_mode() && m.view && !m.view->bypass()) {
      const std::string w = m.name + ": bypass mode needs a drop-in lycoris::nn layer with zero padding; '" + m.path +
                            "' (" + m.view->type_name() + ") uses rebuild mode";
      warnings_.push_back(w);
      TORCH_WARN_ONCE("lycoris: ", w, " (and possibly other layers: see warnings())");
    }
}

LycorisNetworkImpl::LycorisNetworkImpl(HostModulePtr model, NetworkOptions options,
                                       std::vector<NetworkModule> modules, std::vector<std::string> warnings)
    : model_(std::move(model)), options_(std::move(options)), warnings_(std::move(warnings)),
      state_(std::make_shared<State>()) {
  check_network_options(options_);
  state_->multiplier = options_.multiplier();
  for (auto& m : modules) add_module_(std::move(m));
}

LycorisNetworkImpl::~LycorisNetworkImpl() {
  if (!applied_) return;
  try {
    restore();
  } catch (...) {
  }
}

void LycorisNetworkImpl::add_module_(NetworkModule m) {
  for (const auto& other : modules_)
    if (other.name == m.name) throw KeyError("duplicate module name " + m.name);
  if (!m.view && m.host) m.view = host_module(m.host)->layer();
  register_module(m.name, m.adapter);
  modules_.push_back(std::move(m));
}

const NetworkModule* LycorisNetworkImpl::find(const std::string& name) const {
  for (const auto& m : modules_)
    if (m.name == name) return &m;
  return nullptr;
}

double LycorisNetworkImpl::multiplier() const { return state_->multiplier; }

const std::vector<std::pair<torch::Device, torch::Tensor>>& LycorisNetworkImpl::rng_before_refresh() const {
  return state_->rng;
}

void LycorisNetworkImpl::bind_(const NetworkModule& m, bool bypass) {
  const std::shared_ptr<const double> mult(state_, &state_->multiplier);
  if (bypass && m.view) {
    if (auto* bh = m.view->bypass()) {
      bh->attach(state_.get(), m.adapter, mult);
      return;
    }
    const std::string w = m.name + ": bypass mode needs a drop-in lycoris::nn layer with zero padding; '" + m.path +
                          "' (" + m.view->type_name() + ") uses rebuild mode";
    if (std::find(warnings_.begin(), warnings_.end(), w) == warnings_.end()) warnings_.push_back(w);
  }
  detail::bind(m, state_.get(), mult);
}

void LycorisNetworkImpl::apply_to() {
  if (merged_)
    throw Error("apply_to after merge_to: the model already holds this network's ΔW (applying it would add it again)");
  if (applied_) return;
  state_->rng = detail::generator_states(*this);
  try {
    for (const auto& m : modules_) bind_(m, m.adapter->options().bypass_mode());
  } catch (...) {
    restore();
    throw;
  }
  applied_ = true;
}

void LycorisNetworkImpl::restore() {
  for (const auto& m : modules_) {
    if (!m.view) continue;
    if (auto* bh = m.view->bypass()) bh->detach(state_.get());
    detail::unbind(*m.view, state_.get());
  }
  applied_ = false;
}

void LycorisNetworkImpl::refresh() {
  if (!applied_) return;
  check_placement_();
  state_->rng = detail::generator_states(*this);
  for (const auto& m : modules_)
    if (m.view) detail::recompute(*m.view, state_.get());
}

void LycorisNetworkImpl::on_step() {
  for (const auto& m : modules_) m.adapter->on_step();
  refresh();
}

void LycorisNetworkImpl::set_multiplier(double m) {
  if (!std::isfinite(m)) throw OptionError("network multiplier must be finite");
  state_->multiplier = m;
  options_.multiplier(m);
  refresh();
}

void LycorisNetworkImpl::merge_to(double m) {
  if (merged_) throw Error("merge_to: this network is already merged into the model (merging again would add ΔW twice)");
  // all or nothing: a layer that cannot take a bias change is found before any weight is written
  for (const auto& mod : modules_) {
    if (!mod.adapter->changes_bias() || detail::base_weights(detail::adaptable_layer(mod)).second.defined()) continue;
    if (auto why = mod.view->bias_refusal(); !why.empty()) throw Error("merge_to: " + mod.name + ": " + why);
  }
  if (applied_) restore();
  torch::NoGradGuard no_grad;
  for (const auto& mod : modules_) {
    const HostLayer& layer = detail::adaptable_layer(mod);
    auto [W0, b0] = detail::base_weights(layer);
    auto& a = *mod.adapter;
    const bool training = a.is_training();
    a.eval();  // merging is deterministic: no dropouts
    try {
      auto W = a.apply_weight(W0, m);
      auto b = a.apply_bias(b0, m);
      if (!W.is_same(W0)) W0.copy_(W);
      if (b.defined() && !(b0.defined() && b.is_same(b0))) {
        if (b0.defined()) {
          b0.copy_(b);
        } else {  // Full/Norm bias change on a layer without bias: the layer gets one
          auto bias = b.detach().clone();
          if (!mod.view->add_bias(bias, W0.requires_grad()))
            warnings_.push_back(mod.name + ": bias of '" + mod.path + "' set without registering a parameter");
          detail::set_base_bias(layer, bias);
        }
      }
    } catch (...) {
      a.train(training);
      throw;
    }
    a.train(training);
    detail::recompute_all(layer);  // other networks stacked here act on the merged weight
  }
  merged_ = true;
}

void LycorisNetworkImpl::step(torch::optim::Optimizer& optimizer) {
  optimizer.step();
  optimizer.zero_grad();
  on_step();
}

bool LycorisNetworkImpl::stale() const {
  if (!applied_) return false;
  for (const auto& m : modules_)
    if (m.view && detail::stale(*m.view, state_.get())) return true;
  return false;
}

void LycorisNetworkImpl::refresh_if_stale_() const {
  // const callers (save_weights, summary) may refresh: the bound weights are a cache of the parameters
  if (stale()) const_cast<LycorisNetworkImpl*>(this)->refresh();
}

void LycorisNetworkImpl::check_placement_() const {
  for (const auto& m : modules_) {
    if (!m.view) continue;
    const auto W0 = detail::base_weights(*m.view).first;
    const auto bound = m.view->weight();
    if (W0.defined() && bound.defined() && (W0.device() != bound.device() || W0.scalar_type() != bound.scalar_type()))
      throw Error("lycoris: the model was moved (model->to()) while network is applied: layer '" + m.path + "' holds " +
                  c10::str(W0.scalar_type(), " on ", W0.device()) + " but its adapted weight is " +
                  c10::str(bound.scalar_type(), " on ", bound.device()) +
                  "; call net->to(<same>) after model->to(), or restore(), move, apply_to()");
  }
}

void LycorisNetworkImpl::train(bool on) {
  torch::nn::Module::train(on);
  if (applied_) refresh();
}

void LycorisNetworkImpl::recompute_moved_() {
  if (!applied_) return;
  state_->rng = detail::generator_states(*this);
  for (const auto& m : modules_)
    if (m.view) detail::recompute_all(*m.view);
}

void LycorisNetworkImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(device, dtype, non_blocking);
  recompute_moved_();
}

void LycorisNetworkImpl::to(torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(dtype, non_blocking);
  recompute_moved_();
}

void LycorisNetworkImpl::to(torch::Device device, bool non_blocking) {
  torch::nn::Module::to(device, non_blocking);
  recompute_moved_();
}

namespace {

// The model's own parameters: a torch::nn model's, else every layer's registered weight and bias (also
// while bound, when its forward reads W' instead).
std::vector<torch::Tensor> host_parameters(const HostModulePtr& model) {
  if (auto m = model->torch_module()) return m->parameters();
  std::vector<torch::Tensor> out;
  for (const auto& [path, node] : preorder(model))
    if (auto view = node->layer()) {
      auto [W0, b0] = detail::base_weights(*view);
      if (W0.defined()) out.push_back(W0);
      if (b0.defined()) out.push_back(b0);
    }
  return out;
}

}  // namespace

void LycorisNetworkImpl::freeze_model() {
  for (auto& p : host_parameters(model_)) p.requires_grad_(false);
  for (const auto& m : modules_)
    if (m.view) detail::freeze_base(*m.view);  // bound layers: restore() keeps them frozen
}

NetworkSummary LycorisNetworkImpl::summary() const {
  refresh_if_stale_();
  NetworkSummary s;
  for (const auto& m : modules_) {
    auto it = std::find_if(s.groups.begin(), s.groups.end(), [&](const auto& g) { return g.algo == m.algo; });
    if (it == s.groups.end()) it = s.groups.insert(s.groups.end(), NetworkSummary::Group{m.algo});
    const int64_t r = m.adapter->rank();
    it->min_rank = it->modules ? std::min(it->min_rank, r) : r;
    it->max_rank = std::max(it->max_rank, r);
    ++it->modules;
    for (const auto& p : m.adapter->parameters())
      if (p.requires_grad()) {
        it->parameters += p.numel();
        s.trainable += p.numel();
      }
  }
  s.modules = static_cast<int64_t>(modules_.size());
  std::set<const void*> seen;  // shared parameters once
  for (const auto& p : host_parameters(model_)) {
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    s.model_parameters += p.numel();
    if (p.requires_grad()) s.model_trainable += p.numel();
  }
  return s;
}

std::vector<std::pair<std::string, torch::Tensor>> LycorisNetworkImpl::state_tensors(torch::Dtype dtype) const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& m : modules_)
    for (auto& [suffix, t] : m.adapter->file_tensors()) {
      auto v = t.detach().to(torch::kCPU);
      // a scalar (alpha) the save dtype cannot hold stays F32: loaders read any float dtype, and an Inf alpha
      // would change the file's meaning
      if (v.is_floating_point() && !(v.numel() == 1 && !v.to(dtype).isfinite().all().item<bool>() &&
                                     v.isfinite().all().item<bool>()))
        v = v.to(dtype);
      out.emplace_back(m.name + "." + suffix, v.contiguous());
    }
  return out;
}

void LycorisNetworkImpl::save_weights(const std::string& path, torch::Dtype dtype,
                                      const std::map<std::string, std::string>& metadata) const {
  refresh_if_stale_();
  std::map<std::string, std::string> meta = {
      {"lycoris_version", LYCORIS_VERSION},
      {"lycoris_reference_version", LYCORIS_REFERENCE_VERSION},
      {"lycoris_algo", options_.module().algo()},
      {"lycoris_preset", options_.preset().name},
      {"lycoris_options", options_json(options_).dump()},
  };
  for (const auto& kv : metadata) meta[kv.first] = kv.second;
  io::save_file(path, state_tensors(dtype), meta);
}

std::string NetworkSummary::text() const {
  auto grouped = [](int64_t n) {  // 1234567 → "1,234,567"
    std::string s = std::to_string(n);
    for (int i = static_cast<int>(s.size()) - 3; i > (n < 0 ? 1 : 0); i -= 3) s.insert(static_cast<size_t>(i), ",");
    return s;
  };
  const int64_t all = model_parameters + trainable;
  char share[32];
  std::snprintf(share, sizeof share, "%.4f", all ? 100.0 * static_cast<double>(trainable) / static_cast<double>(all) : 0.0);
  std::string out = "trainable params: " + grouped(trainable) + " || all params: " + grouped(all) + " || trainable%: " + share + "\n";
  for (const auto& g : groups) {
    out += "  " + g.algo + ": " + std::to_string(g.modules) + " module(s)";
    if (g.max_rank > 0)
      out += ", rank " + (g.min_rank == g.max_rank ? std::to_string(g.max_rank) : std::to_string(g.min_rank) + "–" + std::to_string(g.max_rank));
    out += ", " + grouped(g.parameters) + " trainable params\n";
  }
  if (model_trainable > 0)
    out += "warning: " + grouped(model_trainable) + " parameters of the model itself still require grad (freeze_model() freezes them)\n";
  return out;
}

// ---------------------------------------------------------------- creation

LycorisNetwork create_lycoris(std::shared_ptr<torch::nn::Module> model, NetworkOptions opts) {
  return LycorisNetwork(std::move(model), std::move(opts));
}

NetworkOptions detail::with_positional(NetworkOptions opts, double multiplier, int64_t linear_dim, double linear_alpha) {
  // one place per value: a field set in `opts` (away from its default) must agree with the argument
  const NetworkOptions d;
  auto clash = [](const char* field, double argument, double option, double fallback) {
    if (option != fallback && option != argument)
      throw OptionError(std::string("create_lycoris: ") + field + " is " + c10::str(argument) + " as an argument but " +
                        c10::str(option) + " in NetworkOptions; set it in one place (create_lycoris(model, options) "
                        "takes every value from the options)");
  };
  clash("multiplier", multiplier, opts.multiplier(), d.multiplier());
  clash("linear_dim", static_cast<double>(linear_dim), static_cast<double>(opts.linear_dim()), static_cast<double>(d.linear_dim()));
  clash("linear_alpha", linear_alpha, opts.linear_alpha(), d.linear_alpha());
  opts.multiplier(multiplier).linear_dim(linear_dim).linear_alpha(linear_alpha);
  return opts;
}

LycorisNetwork create_lycoris(std::shared_ptr<torch::nn::Module> model, double multiplier, int64_t linear_dim,
                              double linear_alpha, NetworkOptions opts) {
  return LycorisNetwork(std::move(model), detail::with_positional(std::move(opts), multiplier, linear_dim, linear_alpha));
}

LycorisNetwork create_lycoris_from_weights(std::shared_ptr<torch::nn::Module> model, const std::string& file,
                                           double multiplier, const Preset& preset) {
  if (!model) throw OptionError("create_lycoris_from_weights: no model");
  return create_lycoris_from_weights(host_module(std::move(model)), file, multiplier, preset);
}

LycorisNetwork create_lycoris_from_weights(HostModulePtr model, const std::string& file, double multiplier,
                                           const Preset& preset) {
  if (!model) throw OptionError("create_lycoris_from_weights: no model");
  auto f = io::SafetensorsFile::open(file);
  auto groups = group_modules(f);
  // module names in order of first appearance in the file (docs/training.md#loading)
  std::vector<std::string> order;
  {
    std::set<std::string> seen;
    for (const auto& key : f.names()) {
      const auto dot = key.find('.');
      if (dot == std::string::npos) continue;
      auto name = key.substr(0, dot);
      if (seen.insert(name).second) order.push_back(name);
    }
  }

  // The model's adaptable layers, named like checkpoint keys so that the resolver can name them.
  std::map<std::string, std::pair<HostModulePtr, HostLayerPtr>> layers;  // by path
  std::vector<std::string> keys;
  for (const auto& [path, node] : preorder(model))
    if (auto view = node->layer()) {
      layers.emplace(path, std::make_pair(node, view));
      keys.push_back(path.empty() ? "weight" : path + ".weight");
    }
  // "<prefix>_<path>" with the preset's prefix, then the other known ones: a layer answers to the first of
  // its names the file uses (a second module naming the same layer matches nothing)
  std::vector<std::string> prefixes = {preset.lora_prefix};
  for (const auto& p : naming::known_prefixes())
    if (p != preset.lora_prefix) prefixes.push_back(p);
  const naming::Dialect file_names{
      "standalone", [&](const std::vector<naming::BaseLayer>& base, const std::function<void(naming::Resolution)>& emit) {
        for (const auto& layer : base)
          for (const auto& p : prefixes)
            if (auto name = naming::module_name(p, layer.path); groups.count(name)) {
              emit({name, layer, "standalone", p, layer.path});
              break;
            }
      }};
  const naming::Resolver names(keys, {file_names});

  std::vector<NetworkModule> modules;
  std::vector<std::string> warnings;
  using Outcome = detail::ModuleFit::Outcome;
  for (const auto& name : order) {
    const auto& tensors = groups.at(name);
    const auto fit = detail::fit_module(names, name, name, tensors, [&](const naming::Resolution& r) {
      return layers.at(r.layer.path).second->spec();
    });
    if (fit.outcome == Outcome::Unmatched) {
      warnings.push_back(file + ": module " + name + " matches no layer of the model (ignored)");
      continue;
    }
    if (fit.outcome == Outcome::NoAlgorithm) throw KeyError(file + ": " + name + ": " + detail::no_algorithm_problem(tensors));
    if (fit.outcome == Outcome::Malformed) {
      try {
        std::rethrow_exception(fit.malformed);
      } catch (const KeyError& e) {  // other errors pass as they are
        throw KeyError(file + ": " + e.what());
      }
    }
    if (fit.outcome == Outcome::Misfit)
      throw ShapeError(file + ": module " + name + " does not fit its layer: " + fit.misfit_error + " (layer '" +
                       fit.misfit->layer.path + "', " + layers.at(fit.misfit->layer.path).second->spec().describe() + ")");
    if (fit.outcome == Outcome::Ambiguous) {
      std::string paths;
      for (const auto& [r, adapter] : fit.fits) paths += (paths.empty() ? "" : ", ") + r->layer.path;
      throw KeyError(file + ": module " + name + " is ambiguous, it fits several layers (" + paths + ")");
    }
    const auto& [r, adapter] = fit.fits.front();
    const auto& [node, view] = layers.at(r->layer.path);
    modules.push_back(NetworkModule{name, r->layer.path, adapter->algo(), view->spec(), node->torch_module(), adapter, view});
  }
  if (modules.empty() && !order.empty())
    throw KeyError(file + ": none of its " + std::to_string(order.size()) + " module(s) matches a layer of the model (e.g. '" +
                   order.front() + "'; its layers are named '<prefix>_<path>' with prefix " + join(prefixes, ", ") + ")");
  NetworkOptions opts;
  opts.multiplier(multiplier).preset(preset).allow_empty(true);
  if (!modules.empty()) opts.module(AdapterOptions().algo(modules.front().algo));
  return LycorisNetwork(std::move(model), std::move(opts), std::move(modules), std::move(warnings));
}

}  // namespace lycoris
