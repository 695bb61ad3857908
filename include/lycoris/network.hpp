// A LyCORIS network: the adapters created for one host model (docs/training.md), trained, saved, loaded,
// applied and merged without modifying the model's code.
//
//   auto net = lycoris::create_lycoris(model, lycoris::NetworkOptions().linear_dim(8).linear_alpha(4)
//                  .module(lycoris::LoKrOptions().factor(8)));  // OptionError when nothing matches
//   net->freeze_model();                               // the model's own parameters never train
//   net->apply_to();                                   // binds W0 + m·ΔW into every adapted layer
//   std::cout << net->summary().text();                // what trains
//   torch::optim::AdamW opt(net->parameters(), 1e-3);  // adapter parameters only
//   for (...) {
//     auto loss = ...model->forward(x)...;  loss.backward();
//     net->step(opt);                                  // opt.step(), opt.zero_grad(), on_step()
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
// the graph a second time"). step(optimizer) does optimizer.step(), zero_grad() and on_step() together.
// Forward passes without a backward (evaluation) read the weights as of the last refresh(); train()/eval(),
// save_weights, merge_to and summary() refresh stale ones. set_multiplier() and apply_to() refresh by
// themselves. Dropouts (neuron/rank/module) follow the network's train()/eval() mode and are drawn once
// per refresh(). After model->to(device/dtype) while bound, call net->to(<the same>): it moves the adapters
// and recomputes W' (refresh() detects a moved model and says so).
//
// BYPASS MODE (module option bypass_mode): y = W0·x + ΔW·x without materialising ΔW (AdapterImpl::
// bypass_forward). It needs a forward that asks the adapters: the drop-in layers lycoris::nn::Linear /
// Conv1d / Conv2d / Conv3d (lycoris/nn/layers.hpp, same constructors as torch::nn's). On any other layer
// (plain torch::nn layers, norms) a bypass-mode module falls back to rebuild mode and the network records a
// warning (warnings(), and logged once at creation). Drop-in layers also work in rebuild mode.
//
// STACKING: several networks can be applied to one model (same layers or not) and restored in any order;
// each layer keeps its own list of attached adapters, shared by all networks.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/optim/optimizer.h>

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

// Rank has one name per level: a network's linear_dim / conv_dim (here), a single adapter's rank
// (AdapterOptions), and a preset override's dim (the reference's spelling; rank is accepted there too).
struct NetworkOptions {
  TORCH_ARG(double, multiplier) = 1.0;
  TORCH_ARG(int64_t, linear_dim) = 4;   // rank of Linear layers and 1×1 convs; 0 = none on them
  TORCH_ARG(double, linear_alpha) = 1.0;
  TORCH_ARG(int64_t, conv_dim) = 0;     // rank of convs with kernel > 1; 0 = linear_dim
  TORCH_ARG(double, conv_alpha) = 0.0;  // 0 = linear_alpha
  TORCH_ARG(bool, train_norm) = false;  // Norm adapters on LayerNorm / GroupNorm
  TORCH_ARG(Preset, preset) = Preset();  // the built-in "full"
  // Algorithm (module.algo()) and every module option. Its rank and alpha are not used (the dims above
  // are): setting them is an OptionError that names the field to set instead.
  TORCH_ARG(AdapterOptions, module) = AdapterOptions();
  // A network that adapts no layer is an OptionError (the preset or targets match nothing), unless allowed.
  TORCH_ARG(bool, allow_empty) = false;
};

// What a network trains, for printing (PEFT's print_trainable_parameters): LycorisNetworkImpl::summary().
struct NetworkSummary {
  struct Group {
    std::string algo;
    int64_t modules = 0;
    int64_t min_rank = 0, max_rank = 0;  // 0 for algorithms without a rank
    int64_t parameters = 0;
  };
  std::vector<Group> groups;      // per algorithm, in discovery order of first use
  int64_t modules = 0;
  int64_t trainable = 0;          // adapter parameters that require grad
  int64_t model_parameters = 0;   // the model's own (base) parameters
  int64_t model_trainable = 0;    // of those, how many still require grad (freeze_model() makes it 0)
  std::string text() const;       // "trainable params: 1,234 || all params: … || trainable%: 0.1234" + a line per group
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
  // Error after merge_to (the model already holds ΔW).
  void apply_to();
  // Unhook every adapter; the model is bit-identical to before apply_to().
  void restore();
  // Fold ΔW at multiplier m into the base weights (and biases, for Full/Norm) permanently, in place (no
  // grad, dropouts off); the network is unhooked from those layers afterwards (other networks stacked on
  // them are recomputed against the merged weight). A layer without bias gets one when the adapter
  // produces a bias change. Once merged, merge_to and apply_to are errors (they would add ΔW again).
  void merge_to(double m = 1.0);
  // New multiplier for every adapter (rebound at once when applied).
  void set_multiplier(double m);
  double multiplier() const;
  // Recompute the bound weights W' of this network's adapters (see the header comment).
  void refresh();
  // Once per optimizer step: every adapter's on_step() (DyLoRA), then refresh() when applied.
  void on_step();
  // optimizer.step(), optimizer.zero_grad() and on_step(): the training step that cannot forget the refresh.
  void step(torch::optim::Optimizer& optimizer);
  bool applied() const { return applied_; }
  bool merged() const { return merged_; }
  // The default random generators' states (CPU, and each other device the adapters live on) just before
  // the bound weights were last computed (refresh, apply_to, to): a training checkpoint (checkpoint.hpp)
  // restores them and refreshes to redraw the same dropouts. Empty before the first computation.
  const std::vector<std::pair<torch::Device, torch::Tensor>>& rng_before_refresh() const;
  // True when an adapter parameter changed (optimizer step) since the bound weights were computed: the
  // model's forward would read old weights. eval()/train(), save_weights, merge_to and summary refresh them.
  bool stale() const;
  // Sets requires_grad false on every parameter of the model (the adapters live in this network), so that
  // an optimizer over model->parameters() trains nothing; restore() keeps them frozen.
  void freeze_model();
  NetworkSummary summary() const;
  // train()/eval() also refresh the bound weights (dropouts follow the mode; evaluation never reads
  // weights older than the last optimizer step).
  void train(bool on = true) override;
  // Moves the adapters; when applied, the bound weights are recomputed against the model's current
  // weights (move the model first: model->to(x); net->to(x)).
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  // Writes every adapter's tensors as "<name>.<suffix>" in discovery order and the reference's key order
  // (docs/format.md#key-order). Floating tensors are cast to `dtype` (integer flags such as on_input keep theirs;
  // a scalar such as alpha that `dtype` cannot hold stays F32).
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

  void refresh_if_stale_() const;
  void recompute_moved_();  // after to(): every bound layer against the moved weights
  void check_placement_() const;

  HostModulePtr model_;
  NetworkOptions options_;
  std::vector<NetworkModule> modules_;
  std::vector<std::string> warnings_;
  std::shared_ptr<State> state_;
  bool applied_ = false;
  bool merged_ = false;
};
TORCH_MODULE(LycorisNetwork);

// docs/training.md#create-lycoris: every value from `opts`.
LycorisNetwork create_lycoris(std::shared_ptr<torch::nn::Module> model, NetworkOptions opts);
// The reference's signature: multiplier, linear_dim and linear_alpha given here. Setting one of them in
// `opts` too, to a different value, is an OptionError (one place per value).
LycorisNetwork create_lycoris(std::shared_ptr<torch::nn::Module> model, double multiplier = 1.0,
                              int64_t linear_dim = 4, double linear_alpha = 1.0, NetworkOptions opts = {});
template <typename ModuleType>
LycorisNetwork create_lycoris(const torch::nn::ModuleHolder<ModuleType>& model, NetworkOptions opts) {
  return create_lycoris(model.ptr(), std::move(opts));
}
template <typename ModuleType>
LycorisNetwork create_lycoris(const torch::nn::ModuleHolder<ModuleType>& model, double multiplier = 1.0,
                              int64_t linear_dim = 4, double linear_alpha = 1.0, NetworkOptions opts = {}) {
  return create_lycoris(model.ptr(), multiplier, linear_dim, linear_alpha, std::move(opts));
}

// docs/training.md#loading: binds every module of `file` to the layer named "<prefix>_<path>" (prefix = the preset's
// lora_prefix, then the other known prefixes), detects its algorithm and loads it with the real LayerSpec of
// the torch layer (stride/padding/dilation/groups/eps/bias). File modules matching no layer are listed in
// warnings() (KeyError when none matches); a module whose shapes do not fit its layer is a ShapeError naming the module and the layer;
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
