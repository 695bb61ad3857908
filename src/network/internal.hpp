// Internals shared by src/network/*.cpp (not installed).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "lycoris/network.hpp"

namespace lycoris::detail {

// docs/training.md#discovery: the adapters a network creates for `model` (discovery order = file key order).
// Non-fatal problems (skipped unsupported norm layers) are appended to `warnings`.
std::vector<NetworkModule> discover(const std::shared_ptr<torch::nn::Module>& model, const NetworkOptions& options,
                                    std::vector<std::string>& warnings);

// ---- per-layer binding stack (rebuild mode), shared by every network applied to a layer

// Attaches (or re-attaches) `adapter` of network `owner` to `host`, computes W' at *multiplier and rebinds.
void bind(const NetworkModule& m, const void* owner, std::shared_ptr<const double> multiplier);
// Removes owner's adapter from host's stack; the last one out restores W0/b0 and their requires_grad.
void unbind(const torch::nn::Module& host, const void* owner);
// Recomputes owner's entry on host (no-op when not bound) and rebinds.
void recompute(const torch::nn::Module& host, const void* owner);
// Recomputes every entry on host (after the base weight changed).
void recompute_all(const torch::nn::Module& host);
// The original parameters of a layer: the binding's W0/b0 when bound, else the members.
std::pair<torch::Tensor, torch::Tensor> base_weights(torch::nn::Module& host);
// Replaces the layer's original bias (merge_to on a layer that had none).
void set_base_bias(torch::nn::Module& host, const torch::Tensor& bias);
// Pointers to the `weight` / `bias` members of a supported layer (nullptr if unsupported).
torch::Tensor* weight_member(torch::nn::Module& host);
torch::Tensor* bias_member(torch::nn::Module& host);

}  // namespace lycoris::detail
