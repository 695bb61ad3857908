// The host model as a network sees it: a tree of named modules (HostModule), some of which are layers it
// can adapt (HostLayer: the LayerSpec, the weight and bias the layer's forward reads, and how adapters are
// hooked into it). Discovery, binding and loading talk to these views only, never to a concrete layer type.
//
// torch::nn models are one implementation (host_module()): Linear, Conv1d/2d/3d (incl. the drop-in bypass
// layers of lycoris/nn/layers.hpp), affine single-axis LayerNorm and affine GroupNorm, from one table of
// layer types. Another kind of host model implements HostModule and HostLayer the same way.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lycoris/layer.hpp"

namespace lycoris {

namespace nn {
class BypassHost;
}

class HostLayer {
 public:
  explicit HostLayer(LayerSpec spec) : spec_(std::move(spec)) {}
  virtual ~HostLayer() = default;

  // The layer as its adapters see it.
  const LayerSpec& spec() const { return spec_; }
  // Its class name, for messages ("Linear", "Conv2d", …).
  virtual std::string type_name() const = 0;
  // The layer object itself: views of one layer share one binding, whichever network made them.
  virtual const void* identity() const = 0;

  // The weight and bias its forward reads now: its parameters, unless bound (bias undefined when none).
  virtual torch::Tensor weight() const = 0;
  virtual torch::Tensor bias() const = 0;
  // Rebuild mode: the forward reads W and b from now on; the registered parameters stay untouched.
  virtual void bind(const torch::Tensor& W, const torch::Tensor& b) = 0;
  // The forward reads W0 and b0 again, the tensors weight() and bias() gave before the first bind.
  virtual void restore(const torch::Tensor& W0, const torch::Tensor& b0) = 0;
  // Merging a bias change into a layer without bias: its forward reads `bias` from now on, registered as
  // its parameter "bias" when the layer allows it (false when not).
  virtual bool add_bias(const torch::Tensor& bias, bool requires_grad) = 0;
  // Why add_bias would fail on this layer, or "" when it would not: asked before merging writes anything.
  virtual std::string bias_refusal() const { return ""; }
  // Bypass mode: where the adapters attach, or nullptr when the layer's forward cannot ask them (the
  // network then binds in rebuild mode).
  virtual nn::BypassHost* bypass() { return nullptr; }

 private:
  LayerSpec spec_;
};
using HostLayerPtr = std::shared_ptr<HostLayer>;

class HostModule {
 public:
  virtual ~HostModule() = default;

  // Class name for the presets' target_module and module_algo_map ("Linear", "CrossAttention", …).
  virtual std::string type_name() const = 0;
  // The module object itself: a module reached through two paths is visited once.
  virtual const void* identity() const = 0;
  // Named direct children, in registration order.
  virtual std::vector<std::pair<std::string, std::shared_ptr<HostModule>>> children() const = 0;
  // The module as a layer a network can adapt; nullptr when it is none. `why` (if given) receives the
  // reason when it is a supported kind with unsupported settings.
  virtual HostLayerPtr layer(std::string* why = nullptr) const = 0;
  // The torch::nn module it is, if it is one (NetworkModule::host).
  virtual std::shared_ptr<torch::nn::Module> torch_module() const { return nullptr; }
};
using HostModulePtr = std::shared_ptr<HostModule>;

// Every (dotted path, module) of the tree in pre-order, root first with "", shared submodules once.
std::vector<std::pair<std::string, HostModulePtr>> preorder(const HostModulePtr& root);

// A torch::nn model (or any of its submodules) as a host tree.
HostModulePtr host_module(std::shared_ptr<torch::nn::Module> module);

}  // namespace lycoris
