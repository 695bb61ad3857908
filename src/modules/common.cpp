#include "modules/common.hpp"

#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"

namespace lycoris {

namespace {

// The options of scope Some set away from their defaults (options.hpp), by name.
std::vector<std::string> non_default_options(const AdapterOptions& o) {
  const AdapterOptions d;
  std::vector<std::string> out;
#define LYCORIS_CHECK_DEFAULT(type, field, init, key, aliases, scope) \
  if (OptionScope::scope == OptionScope::Some && o.field() != d.field()) out.emplace_back(#field);
  LYCORIS_MODULE_OPTIONS(LYCORIS_CHECK_DEFAULT)
#undef LYCORIS_CHECK_DEFAULT
  return out;
}

// TORCH_WARN each distinct message once per process (a network creates hundreds of modules).
void warn_once(const std::string& message) {
  static std::mutex mutex;
  static std::set<std::string> seen;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (!seen.insert(message).second) return;
  }
  TORCH_WARN(message);
}

}  // namespace

std::string unsupported_host(const LayerSpec& layer, Hosts hosts) {
  if (hosts == Hosts::Norms)
    return layer.is_norm() ? functional::empty_weight(layer) : layer.describe() + " is not a LayerNorm or GroupNorm layer";
  return functional::unsupported_layer(layer);
}

void check_options(const std::string& algo, const LayerSpec& layer, const AdapterOptions& o, Hosts hosts,
                   bool needs_rank) {
  const std::string who = algo + " on " + layer.describe() + ": ";
  if (auto why = unsupported_host(layer, hosts); !why.empty()) throw OptionError(who + why);
  if (needs_rank && o.rank() < 1) throw OptionError(who + "rank must be >= 1, got " + std::to_string(o.rank()));
  for (auto [name, p] : {std::pair<const char*, double>{"dropout", o.dropout()},
                         {"rank_dropout", o.rank_dropout()},
                         {"module_dropout", o.module_dropout()}})
    if (!(p >= 0.0 && p <= 1.0)) throw OptionError(who + name + " must be in [0, 1], got " + std::to_string(p));
  if (algo == "full" && o.bypass_mode())
    throw OptionError(who + "bypass_mode is not available for full (it trains the weight itself, docs/training.md#algo-full)");
  const auto& used = find_algorithm(algo).options;
  for (const auto& name : non_default_options(o))
    if (std::find(used.begin(), used.end(), name) == used.end())
      warn_once(algo + ": option " + name + " does not apply to this algorithm and is ignored");
}

int64_t stored_size(const TensorMap& tensors, std::initializer_list<const char*> keys, int64_t dim) {
  for (const char* key : keys) {
    auto t = functional::optional(tensors, key);
    if (t.defined() && t.dim() > 0) return t.size(dim);
  }
  return 0;
}

bool supports_weight_layer(const LayerSpec& layer) { return functional::unsupported_layer(layer).empty(); }

double alpha_or_nan(const std::string& module, const TensorMap& tensors) {
  auto a = functional::optional(tensors, "alpha");
  return a.defined() ? functional::scalar_value(a, module, "alpha") : std::nan("");
}

void add_alpha_traits(Traits& traits, int64_t rank, double alpha) {
  if (rank <= 0) return;
  if (std::isnan(alpha)) traits.push_back("no-alpha");
  else if (alpha != static_cast<double>(rank)) traits.push_back("alpha-not-rank");
}

void add_kind_trait(Traits& traits, const torch::Tensor& weight_like) {
  if (!weight_like.defined()) return;
  if (auto kind = layer_kind_trait(weight_like.dim()); !kind.empty()) traits.push_back(kind);
}

torch::Tensor folded(const torch::Tensor& x, double s) {
  return (x.to(torch::kFloat64) * s).to(x.scalar_type()).contiguous();
}

std::string peft_lacks(const std::string& algo, const std::string& why) { return algo + " (PEFT's " + why + ")"; }

}  // namespace lycoris
