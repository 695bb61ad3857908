// LycorisNetwork: create, apply/restore/merge, save, and rebuild from a file (network.hpp, docs/training.md).
#include "lycoris/network.hpp"

#include <torch/torch.h>

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
#include "lycoris/version.hpp"

namespace lycoris {

struct LycorisNetworkImpl::State {
  double multiplier = 1.0;
};

namespace {

void check_network_options(const NetworkOptions& o) {
  if (!std::isfinite(o.multiplier())) throw OptionError("network multiplier must be finite");
  if (o.linear_dim() < 0) throw OptionError("linear_dim must be >= 0, got " + std::to_string(o.linear_dim()));
  if (o.conv_dim() < 0) throw OptionError("conv_dim must be >= 0, got " + std::to_string(o.conv_dim()));
}

nlohmann::json options_json(const NetworkOptions& n) {
  const auto& o = n.module();
  return {{"algo", o.algo()},
          {"multiplier", n.multiplier()},
          {"linear_dim", n.linear_dim()},
          {"linear_alpha", n.linear_alpha()},
          {"conv_dim", n.conv_dim()},
          {"conv_alpha", n.conv_alpha()},
          {"train_norm", n.train_norm()},
          {"preset", n.preset().name},
          {"use_tucker", o.tucker()},
          {"use_scalar", o.use_scalar()},
          {"weight_decompose", o.dora()},
          {"wd_on_out", o.wd_on_out()},
          {"rs_lora", o.rs_lora()},
          {"dropout", o.dropout()},
          {"rank_dropout", o.rank_dropout()},
          {"rank_dropout_scale", o.rank_dropout_scale()},
          {"module_dropout", o.module_dropout()},
          {"factor", o.factor()},
          {"decompose_both", o.decompose_both()},
          {"full_matrix", o.full_matrix()},
          {"unbalanced_factorization", o.unbalanced_factorization()},
          {"block_size", o.block_size()},
          {"constraint", o.constraint()},
          {"rescaled", o.rescaled()},
          {"train_on_input", o.train_on_input()},
          {"bypass_mode", o.bypass_mode()}};
}

}  // namespace

LycorisNetworkImpl::LycorisNetworkImpl(std::shared_ptr<torch::nn::Module> model, NetworkOptions options)
    : LycorisNetworkImpl(model ? host_module(std::move(model)) : nullptr, std::move(options)) {}

LycorisNetworkImpl::LycorisNetworkImpl(HostModulePtr model, NetworkOptions options)
    : model_(std::move(model)), options_(std::move(options)), state_(std::make_shared<State>()) {
  if (!model_) throw OptionError("create_lycoris: no model");
  check_network_options(options_);
  state_->multiplier = options_.multiplier();
  for (auto& m : detail::discover(model_, options_, warnings_)) add_module_(std::move(m));
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
  if (applied_) return;
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
}

std::vector<std::pair<std::string, torch::Tensor>> LycorisNetworkImpl::state_tensors(torch::Dtype dtype) const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& m : modules_)
    for (auto& [suffix, t] : m.adapter->file_tensors()) {
      auto v = t.detach().to(torch::kCPU);
      if (v.is_floating_point()) v = v.to(dtype);
      out.emplace_back(m.name + "." + suffix, v.contiguous());
    }
  return out;
}

void LycorisNetworkImpl::save_weights(const std::string& path, torch::Dtype dtype,
                                      const std::map<std::string, std::string>& metadata) const {
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

// ---------------------------------------------------------------- creation

LycorisNetwork create_lycoris(std::shared_ptr<torch::nn::Module> model, double multiplier, int64_t linear_dim,
                              double linear_alpha, NetworkOptions opts) {
  opts.multiplier(multiplier).linear_dim(linear_dim).linear_alpha(linear_alpha);
  return LycorisNetwork(std::move(model), std::move(opts));
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
  NetworkOptions opts;
  opts.multiplier(multiplier).preset(preset);
  if (!modules.empty()) opts.module(AdapterOptions().algo(modules.front().algo));
  return LycorisNetwork(std::move(model), std::move(opts), std::move(modules), std::move(warnings));
}

}  // namespace lycoris
