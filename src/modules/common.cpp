#include "lycoris/modules/common.hpp"

#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"

namespace lycoris {

namespace {

// The options (besides rank, alpha and module_dropout, which the network passes to every module) each
// algorithm reads (TRAINING.md §3.4, §4, §9).
const std::vector<std::string>& used_options(const std::string& algo) {
  static const std::vector<std::string> low_rank = {"tucker",  "use_scalar",   "dora",
                                                    "rs_lora", "dropout",      "rank_dropout",
                                                    "rank_dropout_scale"};
  static const std::vector<std::string> kron = [] {
    auto v = low_rank;
    v.insert(v.end(), {"factor", "decompose_both", "full_matrix", "unbalanced_factorization"});
    return v;
  }();
  static const std::vector<std::pair<std::string, std::vector<std::string>>> table = {
      {"lora", low_rank},
      {"loha", low_rank},
      {"lokr", kron},
      {"glokr", kron},
      {"dylora", {"block_size"}},
      {"glora", {"use_scalar", "rs_lora", "dropout", "rank_dropout", "rank_dropout_scale"}},
      {"full", {}},
      {"ia3", {"train_on_input"}},
      {"diag-oft", {"constraint", "rescaled", "rank_dropout"}},
      {"boft", {"constraint", "rescaled"}},
      {"norm", {"rank_dropout", "rank_dropout_scale"}},
  };
  static const std::vector<std::string> none;
  for (const auto& [name, used] : table)
    if (name == algo) return used;
  return none;
}

// The options set away from their defaults (options.hpp), by name.
std::vector<std::string> non_default_options(const AdapterOptions& o) {
  const AdapterOptions d;
  std::vector<std::string> out;
  auto check = [&](const char* name, bool differs) {
    if (differs) out.emplace_back(name);
  };
  check("tucker", o.tucker() != d.tucker());
  check("use_scalar", o.use_scalar() != d.use_scalar());
  check("dora", o.dora() != d.dora());
  check("rs_lora", o.rs_lora() != d.rs_lora());
  check("dropout", o.dropout() != d.dropout());
  check("rank_dropout", o.rank_dropout() != d.rank_dropout());
  check("rank_dropout_scale", o.rank_dropout_scale() != d.rank_dropout_scale());
  check("factor", o.factor() != d.factor());
  check("decompose_both", o.decompose_both() != d.decompose_both());
  check("full_matrix", o.full_matrix() != d.full_matrix());
  check("unbalanced_factorization", o.unbalanced_factorization() != d.unbalanced_factorization());
  check("block_size", o.block_size() != d.block_size());
  check("constraint", o.constraint() != d.constraint());
  check("rescaled", o.rescaled() != d.rescaled());
  check("train_on_input", o.train_on_input() != d.train_on_input());
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
    throw OptionError(who + "bypass_mode is not available for full (it trains the weight itself, TRAINING.md §4.4)");
  const auto& used = used_options(algo);
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

}  // namespace lycoris
