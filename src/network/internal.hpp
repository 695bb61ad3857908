// Internals shared by src/network/*.cpp (not installed).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "lycoris/network.hpp"

namespace lycoris::detail {

// docs/training.md#discovery: the adapters a network creates for `model` (discovery order = file key order).
// Non-fatal problems (skipped unsupported norm layers) are appended to `warnings`.
std::vector<NetworkModule> discover(const HostModulePtr& model, const NetworkOptions& options,
                                    std::vector<std::string>& warnings);

// The reference's positional create_lycoris values set into `opts`; OptionError when `opts` sets one of
// them (away from its default) to a different value (docs/training.md#create-lycoris).
NetworkOptions with_positional(NetworkOptions opts, double multiplier, int64_t linear_dim, double linear_alpha);

// ---- per-layer binding stack (rebuild mode), shared by every network applied to a layer

// The layer a module adapts; OptionError when it has no layer view or the layer no weight.
const HostLayer& adaptable_layer(const NetworkModule& m);

// Attaches (or re-attaches) `adapter` of network `owner` to its layer (adaptable_layer), computes W' at
// *multiplier and rebinds.
void bind(const NetworkModule& m, const void* owner, std::shared_ptr<const double> multiplier);
// Removes owner's adapter from the layer's stack; the last one out restores W0/b0 and their requires_grad.
void unbind(const HostLayer& layer, const void* owner);
// Recomputes owner's entry on the layer (no-op when not bound) and rebinds.
void recompute(const HostLayer& layer, const void* owner);
// Recomputes every entry on the layer (after the base weight changed).
void recompute_all(const HostLayer& layer);
// The original parameters of a layer: the binding's W0/b0 when bound, else what its forward reads.
std::pair<torch::Tensor, torch::Tensor> base_weights(const HostLayer& layer);
// Whether owner's entry on the layer was computed before its adapter's parameters last changed.
bool stale(const HostLayer& layer, const void* owner);
// A bound layer's W0/b0 stay frozen when the last network unbinds (freeze_model); no-op when not bound.
void freeze_base(const HostLayer& layer);
// The layer's original bias changed (merge_to gave a layer without bias one, HostLayer::add_bias).
void set_base_bias(const HostLayer& layer, const torch::Tensor& bias);

// ---- random generators (training checkpoints replay the draws of the last refresh)

// The default generator of CPU and of every other device a tensor of `module` is on, with its state.
using GeneratorStates = std::vector<std::pair<torch::Device, torch::Tensor>>;
GeneratorStates generator_states(const torch::nn::Module& module);
// Sets each device's default generator to its state; Error naming the device when it has no generator here.
void set_generator_states(const GeneratorStates& states);

}  // namespace lycoris::detail
