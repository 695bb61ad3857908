// A LyCORIS network: the adapters created for one host model (docs/training.md), trained, saved, loaded,
// applied and merged without modifying the model's code.
//
//   auto net = lycoris::create_lycoris(model, 1.0, 8, 4, lycoris::NetworkOptions()
//                  .preset(lycoris::Preset::builtin("attn-mlp")).module(lycoris::LoKrOptions().algo("lokr")));
//   net->apply_to();                                   // binds W0 + m·ΔW into every adapted layer
//   torch::optim::AdamW opt(net->parameters(), 1e-3);  // adapter parameters only
//   for (...) {
//     auto loss = ...model->forward(x)...;  loss.backward();
//     opt.step();  opt.zero_grad();
//     net->on_step();                                  // ONCE PER STEP: per-step state + recompute weights
//   }
//   net->save_weights("out.safetensors");              // reference format (docs/format.md)
//   net->restore();                                    // the model is bit-identical to before apply_to
//
// REBUILD MODE (default) on unmodified torch::nn layers (Linear, Conv1d/2d/3d, LayerNorm, GroupNorm in any
// nesting): libtorch layers read their `weight`/`bias` MEMBERS in forward, and register_parameter keeps its
// own handle. apply_to() sets `layer->weight = W'` (and the bias when the algorithm changes it) where
// W' = W0 + Σ_networks (apply_weight(W0, m) − W0) (docs/training.md#stacking: stacked adapters each act on the
// original weight; one network alone gives exactly apply_weight(W0, m)); the registered parameter W0
// stays what named_parameters() returns, frozen (requires_grad false while bound) and never written.
// restore() assigns W0 back: the model is bit-identical (same tensor objects, flags restored).
// Only the adapted layers' weight/bias are frozen; parameters of layers the network does not adapt keep
// their requires_grad (freeze them yourself if they would otherwise receive gradients you do not want).
//
// ONE RECOMPUTATION PER STEP. W' carries the autograd graph of the adapter parameters; backward frees it
// and optimizer.step() changes the parameters in place, so W' must be recomputed once per step:
// on_step() (adapters' per-step hook, e.g. DyLoRA's block draw, then refresh()) or refresh() alone.
// Forgetting it is loud: the bound weights carry a backward hook that throws lycoris::Error ("... call
// on_step() or refresh() after optimizer.step() ...") when the adapter parameters changed since W' was
// computed; a second backward through the same W' without refresh() fails in torch ("backward through
// the graph a second time"). Forward passes without a backward (evaluation) read the weights as of the
// last refresh(): call refresh() (or on_step()) after the last optimizer step. set_multiplier() and
// apply_to() refresh by themselves. Dropouts (neuron/rank/module) follow the network's train()/eval()
// mode and are drawn once per refresh(). Moving the model with ->to(device/dtype) while bound is not
// supported: restore(), move, apply_to().
//
// BYPASS MODE (module option bypass_mode): y = W0·x + ΔW·x without materialising ΔW (AdapterImpl::
// bypass_forward). It needs a forward that asks the adapters: the drop-in layers lycoris::nn::Linear /
// Conv1d / Conv2d / Conv3d (lycoris/nn/layers.hpp, same constructors as torch::nn's). On any other layer
// (plain torch::nn layers, norms) a bypass-mode module falls back to rebuild mode and the network records a
// warning (warnings()). Drop-in layers also work in rebuild mode.
//
// STACKING: several networks can be applied to one model (same layers or not) and restored in any order;
// each layer keeps its own list of attached adapters, shared by all networks.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lycoris/adapter.hpp"
#include "lycoris/host_layer.hpp"
#include "lycoris/layer.hpp"
#include "lycoris/options.hpp"
#include "lycoris/preset.hpp"

namespace lycoris {

struct NetworkOptions {
  TORCH_ARG(double, multiplier) = 1.0;
  TORCH_ARG(int64_t, linear_dim) = 4;   // rank of Linear layers and 1×1 convs; 0 = none on them
  TORCH_ARG(double, linear_alpha) = 1.0;
  TORCH_ARG(int64_t, conv_dim) = 0;     // rank of convs with kernel > 1; 0 = linear_dim
  TORCH_ARG(double, conv_alpha) = 0.0;  // 0 = linear_alpha
  TORCH_ARG(bool, train_norm) = false;  // Norm adapters on LayerNorm / GroupNorm
  TORCH_ARG(Preset, preset) = Preset();  // the built-in "full"
  // Algorithm (module.algo()) and every module option; rank/alpha are taken from the dims above.
  TORCH_ARG(AdapterOptions, module) = AdapterOptions();
};

// One adapter of a network and the layer it wraps.
struct NetworkModule {
  std::string name;                           // file module name, e.g. "lycoris_blocks_0_attn_to_q"
  std::string path;                           // dotted path of the host layer in the model
  std::string algo;                           // registry name
  LayerSpec layer;                            // the host layer as the adapter sees it
  std::shared_ptr<torch::nn::Module> host;    // the host layer
  AdapterPtr adapter;
  HostLayerPtr view;                          // how the network binds into the host layer (from `host` if unset)
};


class LycorisNetworkImpl : public torch::nn::Module {
 public:
  // Discovers the target layers of `model` (docs/training.md#discovery) and creates one adapter per layer. Not applied
  // yet. OptionError on invalid options / unknown algorithm (naming the module and layer).
  LycorisNetworkImpl(std::shared_ptr<torch::nn::Module> model, NetworkOptions options);
  // The same over any host model tree (lycoris/host_layer.hpp); the one above is this over host_module(model).
  LycorisNetworkImpl(HostModulePtr model, NetworkOptions options);
  ~LycorisNetworkImpl() override;  // restores the model if still applied

  // Hook every adapter into its layer (rebuild: bind W'; bypass: attach to drop-in layers). Idempotent.
  void apply_to();
  // Unhook every adapter; the model is bit-identical to before apply_to().
  void restore();
  // Fold ΔW at multiplier m into the base weights (and biases, for Full/Norm) permanently, in place (no
  // grad, dropouts off); the network is unhooked from those layers afterwards (other networks stacked on
  // them are recomputed against the merged weight). A layer without bias gets one when the adapter
  // produces a bias change.
  void merge_to(double m = 1.0);
  // New multiplier for every adapter (rebound at once when applied).
  void set_multiplier(double m);
  double multiplier() const;
  // Recompute the bound weights W' of this network's adapters (see the header comment).
  void refresh();
  // Once per optimizer step: every adapter's on_step() (DyLoRA), then refresh() when applied.
  void on_step();
  bool applied() const { return applied_; }

  // Writes every adapter's tensors as "<name>.<suffix>" in discovery order and the reference's key order
  // (docs/format.md#key-order). Floating tensors are cast to `dtype` (integer flags such as on_input keep theirs).
  // Metadata: the given entries plus lycoris_version, lycoris_reference_version, lycoris_algo,
  // lycoris_preset and lycoris_options (JSON of the network options); given entries win.
  void save_weights(const std::string& path, torch::Dtype dtype = torch::kFloat,
                    const std::map<std::string, std::string>& metadata = {}) const;
  // The tensors save_weights writes (CPU, detached, cast), in order.
  std::vector<std::pair<std::string, torch::Tensor>> state_tensors(torch::Dtype dtype = torch::kFloat) const;

  const std::vector<NetworkModule>& modules() const { return modules_; }
  const NetworkModule* find(const std::string& name) const;
  // Non-fatal problems: unmatched file modules, bypass fallbacks, skipped unsupported norm layers.
  const std::vector<std::string>& warnings() const { return warnings_; }
  const NetworkOptions& options() const { return options_; }

  // Used by create_lycoris_from_weights: an empty network over `model` with the given modules.
  LycorisNetworkImpl(HostModulePtr model, NetworkOptions options,
                     std::vector<NetworkModule> modules, std::vector<std::string> warnings);

 private:
  struct State;  // shared with the layers' bindings (multiplier, identity)
  void add_module_(NetworkModule m);
  void bind_(const NetworkModule& m, bool bypass);

  HostModulePtr model_;
  NetworkOptions options_;
  std::vector<NetworkModule> modules_;
  std::vector<std::string> warnings_;
  std::shared_ptr<State> state_;
  bool applied_ = false;
};
TORCH_MODULE(LycorisNetwork);

// docs/training.md#create-lycoris with C++ values: the positional arguments override the same fields of `opts`.
LycorisNetwork create_lycoris(std::shared_ptr<torch::nn::Module> model, double multiplier = 1.0,
                              int64_t linear_dim = 4, double linear_alpha = 1.0, NetworkOptions opts = {});
template <typename ModuleType>
LycorisNetwork create_lycoris(const torch::nn::ModuleHolder<ModuleType>& model, double multiplier = 1.0,
                              int64_t linear_dim = 4, double linear_alpha = 1.0, NetworkOptions opts = {}) {
  return create_lycoris(model.ptr(), multiplier, linear_dim, linear_alpha, std::move(opts));
}

// docs/training.md#loading: binds every module of `file` to the layer named "<prefix>_<path>" (prefix = the preset's
// lora_prefix, then the other known prefixes), detects its algorithm and loads it with the real LayerSpec of
// the torch layer (stride/padding/dilation/groups/eps/bias). File modules matching no layer are listed in
// warnings(); a module whose shapes do not fit its layer is a ShapeError naming the module and the layer;
// a name denoting several layers that it all fits is a KeyError. Not applied yet.
LycorisNetwork create_lycoris_from_weights(std::shared_ptr<torch::nn::Module> model, const std::string& file,
                                           double multiplier = 1.0, const Preset& preset = Preset());
template <typename ModuleType>
LycorisNetwork create_lycoris_from_weights(const torch::nn::ModuleHolder<ModuleType>& model, const std::string& file,
                                           double multiplier = 1.0, const Preset& preset = Preset()) {
  return create_lycoris_from_weights(model.ptr(), file, multiplier, preset);
}
// The same over any host model tree (lycoris/host_layer.hpp); the one above is this over host_module(model).
LycorisNetwork create_lycoris_from_weights(HostModulePtr model, const std::string& file, double multiplier = 1.0,
                                           const Preset& preset = Preset());

// The LayerSpec of a torch layer (Linear, Conv1d/2d/3d incl. drop-ins, affine single-axis LayerNorm, affine
// GroupNorm). False when the module is not such a layer; then `why` (if given) receives the reason when the
// module is of a supported kind with unsupported settings (non-affine or multi-axis norm, asymmetric
// "same" padding).
bool layer_spec_of(const torch::nn::Module& module, LayerSpec& out, std::string* why = nullptr);

// Every (dotted path, module) of `model` in pre-order, root first with "", shared submodules once.
std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> named_modules_preorder(
    const std::shared_ptr<torch::nn::Module>& model);

}  // namespace lycoris
