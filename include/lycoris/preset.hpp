// Presets: which layers of a host model a network adapts, and per-module overrides (docs/training.md#presets).
//
// A Preset is a plain value owned by the network built from it (never global state, unlike the reference's
// class attributes, docs/loaders.md#q32-global-presets): two networks with different presets coexist. Built-in presets
// (Preset::builtin) and TOML files in the reference schema (Preset::from_toml_file) produce the same value.
//
// Class names are matched against the C++ module's type name: Module::name() with the namespace and a
// trailing "Impl" stripped (torch::nn::LinearImpl → "Linear", a user `CrossAttentionImpl` → "CrossAttention").
// Name patterns are ECMAScript regexes matched at the start of the dotted module path (Python `re.match`
// semantics: "proj" matches "proj_out"), or shell wildcards (whole path) with use_fnmatch.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "lycoris/options.hpp"

namespace lycoris {

// One value of a per-module override table (TOML scalar).
using OptionValue = std::variant<bool, int64_t, double, std::string>;

// One entry of module_algo_map / name_algo_map: option name → value, in the reference's spelling
// (docs/training.md#overrides): algo, dim, alpha, use_tucker, weight_decompose, wd_on_out, rs_lora, use_scalar,
// rank_dropout_scale, bypass_mode, factor, decompose_both, full_matrix, unbalanced_factorization,
// constraint, rescaled, block_size, train_on_input; also dropout, rank_dropout, module_dropout (the
// reference fails on these) and the aliases dora_wd, wd_on_output, use_cp, constrain, rank, tucker, dora.
// `dim` / `alpha` of 0 mean "the network default" (as in the reference). An unknown key or a value of the
// wrong type is an OptionError (the reference ignores unknown keys silently, docs/loaders.md#q37-ignored-arguments).
struct ModuleOverride {
  std::vector<std::pair<std::string, OptionValue>> options;

  ModuleOverride() = default;
  ModuleOverride(std::initializer_list<std::pair<std::string, OptionValue>> init) : options(init) {}
  ModuleOverride& set(const std::string& key, OptionValue value);
  const OptionValue* get(const std::string& key) const;
  std::string algo() const;  // "" when not set
  int64_t dim() const;       // 0 when not set
  double alpha() const;      // 0 when not set
  // Applies every option except algo/dim/alpha to `o` (OptionError naming `where` and the key).
  void apply_to(AdapterOptions& o, const std::string& where) const;
  // OptionError naming `where` when some key is unknown or has a value of the wrong type.
  void validate(const std::string& where) const;
};

using OverrideMap = std::vector<std::pair<std::string, ModuleOverride>>;  // ordered (first match wins)

struct Preset {
  std::string name = "full";  // built-in name or the TOML file it came from (for messages and metadata)
  bool enable_conv = true;    // false: no adapters on convolutions whose first kernel size is > 1
  std::vector<std::string> target_module = {"Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"};
  std::vector<std::string> target_name;
  std::vector<std::string> exclude_name;
  OverrideMap module_algo_map;  // class name → override (its classes are class targets too)
  OverrideMap name_algo_map;    // path or pattern → override (its keys are name targets too)
  bool use_fnmatch = false;
  std::string lora_prefix = "lycoris";
  // The kohya integration's per-part lists (read and kept; the generic network does not use them).
  std::vector<std::string> unet_target_module, unet_target_name, text_encoder_target_module,
      text_encoder_target_name;
  // Reproduce docs/loaders.md#q33-container-exclusions: layers inside a matched container class ignore exclude_name and name_algo_map.
  // Off by default (exclusions and name overrides apply everywhere); file names are the same either way.
  bool container_quirk = false;

  // Built-ins of docs/training.md#builtin-presets: full, full-lin, attn-mlp, attn-only, unet-only, unet-transformer-only,
  // unet-convblock-only, ia3. "full", "full-lin" and "unet-only" target every Linear/Conv/Norm layer (the
  // generic wrapper's defaults; full-lin without k>1 convs); the others restrict the targets to their
  // class lists (U-Net ∪ text-encoder classes, matched on C++ type names) and names. "ia3" targets
  // to_k/to_v/ff.net.2/k_proj/v_proj/mlp.fc2 anywhere in the model, with train_on_input on ff.net.2 and
  // mlp.fc2 (the reference's anchored short names select nothing, docs/loaders.md#q10-ia3-unreachable). OptionError if unknown.
  static Preset builtin(const std::string& name);
  static const std::vector<std::string>& builtin_names();
  // A TOML document in the reference schema (docs/training.md#toml-presets). Unknown top-level keys, wrong value types
  // and parse errors are OptionErrors naming `source` and the key/line. Keys absent from the file keep the
  // defaults of `base` (the reference overwrites only the keys present).
  static Preset from_toml(const std::string& text, const std::string& source, const Preset& base);
  static Preset from_toml(const std::string& text, const std::string& source = "<preset>");
  static Preset from_toml_file(const std::string& path, const Preset& base);
  static Preset from_toml_file(const std::string& path);
  // A built-in name, else a TOML file path; OptionError if neither.
  static Preset resolve(const std::string& name_or_path);
};

// Type name used for class targets: demangled module name without namespace and trailing "Impl".
std::string module_type_name(const std::string& demangled);

// Pattern matching of docs/training.md#name-patterns (regex anchored at the start, or fnmatch on the whole path);
// OptionError for an invalid regex, naming the pattern.
bool name_matches(const std::string& pattern, const std::string& path, bool use_fnmatch);

}  // namespace lycoris
