// What every adapter module shares at construction and in its registry entry (docs/training.md#supported-layers):
// option validation with one error style, warnings for options an algorithm ignores, and the registry
// snippets (create, rank from stored shapes, supported layers).
#pragma once
#include <initializer_list>
#include <memory>
#include <string>

#include "lycoris/adapter.hpp"
#include "lycoris/algorithms.hpp"

namespace lycoris {

// The layers an algorithm can wrap.
enum class Hosts {
  Weights,  // Linear, Conv1d/2d/3d with groups 1 (grouped convs are rejected, docs/loaders.md#q45-grouped-dilated-padded-convs)
  Norms,    // LayerNorm, GroupNorm
};

// Validates what every algorithm shares and throws OptionError "<algo> on <layer>: <option> …" naming the
// offending option: an unsupported layer; dropout, rank_dropout, module_dropout outside [0, 1]; rank < 1
// when `needs_rank`; bypass_mode for an algorithm without one (Full, docs/training.md#algo-full). Then warns once
// per message (TORCH_WARN) for every option set away from its default that `algo` ignores (docs/training.md#option-checks:
// "warn, not silently ignore").
void check_options(const std::string& algo, const LayerSpec& layer, const AdapterOptions& options, Hosts hosts,
                   bool needs_rank);
// Empty when `hosts` includes the layer, else the reason.
std::string unsupported_host(const LayerSpec& layer, Hosts hosts);

// Registry snippets.
template <class Impl>
AdapterPtr create_adapter(const LayerSpec& layer, const AdapterOptions& options) {
  return std::make_shared<Impl>(layer, options);
}
// size(dim) of the first of `keys` stored with at least one dimension (0 if none): the rank read from a
// module's shapes for `info`.
int64_t stored_size(const TensorMap& tensors, std::initializer_list<const char*> keys, int64_t dim = 0);
bool supports_weight_layer(const LayerSpec& layer);

// For the registry's traits and PEFT forms (algorithms.hpp):
// The stored alpha of a module's tensors, NaN when it has none.
double alpha_or_nan(const std::string& module, const TensorMap& tensors);
// The alpha traits every rank-r algorithm shares: "no-alpha", "alpha-not-rank".
void add_alpha_traits(Traits& traits, int64_t rank, double alpha);
// The layer-kind trait ("linear", "conv1d", "conv2d", "conv3d") of a tensor laid out like the layer's weight
// (out, in, *kernel), from its number of dimensions; nothing for other counts.
void add_kind_trait(Traits& traits, const torch::Tensor& weight_like);
// x·s computed in fp64, stored back in x's dtype (one rounding): a scale folded into a factor.
torch::Tensor folded(const torch::Tensor& x, double s);
// The (unsupported) reason of an algorithm PEFT has no adapter for.
std::string peft_lacks(const std::string& algo, const std::string& why);

}  // namespace lycoris
