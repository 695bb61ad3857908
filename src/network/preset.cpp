// Presets: built-ins (docs/training.md#builtin-presets), TOML files (#toml-presets), per-module overrides
// (#overrides), name matching (#name-patterns).
#include "lycoris/preset.hpp"

#include <fnmatch.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <regex>
#include <sstream>
#include <type_traits>
#include <toml++/toml.h>
#include <unordered_map>

#include "lycoris/error.hpp"

namespace lycoris {

// ---------------------------------------------------------------- matching

bool name_matches(const std::string& pattern, const std::string& path, bool use_fnmatch) {
  if (use_fnmatch) return ::fnmatch(pattern.c_str(), path.c_str(), 0) == 0;
  // compiled patterns are cached: discovery matches every pattern against every module path
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<const std::regex>> cache;
  std::shared_ptr<const std::regex> re;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(pattern);
    if (it != cache.end()) {
      re = it->second;
    } else {
      try {
        re = std::make_shared<const std::regex>(pattern, std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        throw OptionError("invalid name pattern '" + pattern + "': " + e.what());
      }
      if (cache.size() > 4096) cache.clear();
      cache.emplace(pattern, re);
    }
  }
  // Python re.match: anchored at the start, need not reach the end
  return std::regex_search(path, *re, std::regex_constants::match_continuous);
}

// ---------------------------------------------------------------- per-module overrides

namespace {

enum class Kind { Bool, Int, Real, String };

struct OptionKey {
  Kind kind;
  std::function<void(AdapterOptions&, const OptionValue&)> set;  // null for algo/dim/alpha
};

bool as_bool(const OptionValue& v) { return std::get<bool>(v); }
int64_t as_int(const OptionValue& v) { return std::get<int64_t>(v); }
double as_real(const OptionValue& v) {
  return std::holds_alternative<int64_t>(v) ? static_cast<double>(std::get<int64_t>(v)) : std::get<double>(v);
}

template <class T>
constexpr Kind kind_of() {
  if constexpr (std::is_same_v<T, bool>) return Kind::Bool;
  else if constexpr (std::is_integral_v<T>) return Kind::Int;
  else return Kind::Real;
}

template <class T>
T option_value(const OptionValue& v) {
  if constexpr (std::is_same_v<T, bool>) return as_bool(v);
  else if constexpr (std::is_integral_v<T>) return as_int(v);
  else return as_real(v);
}

// The reference spellings and their aliases (docs/training.md#overrides), from LYCORIS_MODULE_OPTIONS; algo, dim
// (alias rank) and alpha are read by the caller.
const std::map<std::string, OptionKey>& option_keys() {
  static const std::map<std::string, OptionKey> keys = [] {
    std::map<std::string, OptionKey> k = {{"algo", {Kind::String, nullptr}},
                                          {"dim", {Kind::Int, nullptr}},
                                          {"rank", {Kind::Int, nullptr}},
                                          {"alpha", {Kind::Real, nullptr}}};
    auto add = [&k](const std::string& key, const std::string& aliases, const OptionKey& option) {
      k.emplace(key, option);
      std::istringstream words(aliases);
      for (std::string alias; words >> alias;) k.emplace(alias, option);
    };
#define LYCORIS_OPTION_KEY(type, field, init, key, aliases, scope) \
  add(key, aliases, {kind_of<type>(), [](AdapterOptions& o, const OptionValue& v) { o.field(option_value<type>(v)); }});
    LYCORIS_MODULE_OPTIONS(LYCORIS_OPTION_KEY)
#undef LYCORIS_OPTION_KEY
    return k;
  }();
  return keys;
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Bool: return "a boolean";
    case Kind::Int: return "an integer";
    case Kind::Real: return "a number";
    case Kind::String: return "a string";
  }
  return "?";
}

bool fits(Kind k, const OptionValue& v) {
  switch (k) {
    case Kind::Bool: return std::holds_alternative<bool>(v);
    case Kind::Int: return std::holds_alternative<int64_t>(v);
    case Kind::Real: return std::holds_alternative<int64_t>(v) || std::holds_alternative<double>(v);
    case Kind::String: return std::holds_alternative<std::string>(v);
  }
  return false;
}

std::string known_keys() {
  std::string s;
  for (const auto& kv : option_keys()) s += (s.empty() ? "" : ", ") + kv.first;
  return s;
}

}  // namespace

ModuleOverride& ModuleOverride::set(const std::string& key, OptionValue value) {
  for (auto& kv : options)
    if (kv.first == key) {
      kv.second = std::move(value);
      return *this;
    }
  options.emplace_back(key, std::move(value));
  return *this;
}

const OptionValue* ModuleOverride::get(const std::string& key) const {
  for (const auto& kv : options)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

std::string ModuleOverride::algo() const {
  const auto* v = get("algo");
  return v && std::holds_alternative<std::string>(*v) ? std::get<std::string>(*v) : std::string();
}

int64_t ModuleOverride::dim() const {
  for (const char* k : {"dim", "rank"})
    if (const auto* v = get(k); v && std::holds_alternative<int64_t>(*v)) return std::get<int64_t>(*v);
  return 0;
}

double ModuleOverride::alpha() const {
  const auto* v = get("alpha");
  return v && fits(Kind::Real, *v) ? as_real(*v) : 0.0;
}

void ModuleOverride::validate(const std::string& where) const {
  for (const auto& [key, value] : options) {
    auto it = option_keys().find(key);
    if (it == option_keys().end())
      throw OptionError(where + ": unknown option '" + key + "' (known: " + known_keys() + ")");
    if (!fits(it->second.kind, value))
      throw OptionError(where + ": option '" + key + "' must be " + kind_name(it->second.kind));
  }
}

void ModuleOverride::apply_to(AdapterOptions& o, const std::string& where) const {
  validate(where);
  for (const auto& [key, value] : options) {
    const auto& k = option_keys().at(key);
    if (k.set) k.set(o, value);
  }
}

// ---------------------------------------------------------------- built-in presets

namespace {

const std::vector<std::string> kDiT = {"HunYuanDiTBlock",
                                       "DoubleStreamBlock",
                                       "SingleStreamBlock",
                                       "SingleDiTBlock",
                                       "MMDoubleStreamBlock",
                                       "MMSingleStreamBlock",
                                       "WanAttentionBlock",
                                       "HunyuanVideoTransformerBlock",
                                       "HunyuanVideoSingleTransformerBlock",
                                       "JointTransformerBlock",
                                       "FinalLayer",
                                       "QwenImageTransformerBlock"};
const std::vector<std::string> kTE = {"CLIPAttention",     "CLIPSdpaAttention",    "CLIPMLP",
                                      "MT5Block",          "BertLayer",            "Gemma2Attention",
                                      "Gemma2FlashAttention2", "Gemma2SdpaAttention", "Gemma2MLP"};
const std::vector<std::string> kTEAttn = {"CLIPAttention",         "CLIPSdpaAttention",    "BertAttention",
                                          "MT5LayerSelfAttention", "Gemma2Attention",      "Gemma2FlashAttention2",
                                          "Gemma2SdpaAttention"};

std::vector<std::string> cat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

const std::vector<std::string>& Preset::builtin_names() {
  static const std::vector<std::string> names = {"full",     "full-lin",  "attn-mlp",
                                                 "attn-only", "unet-only", "unet-transformer-only",
                                                 "unet-convblock-only", "ia3"};
  return names;
}

Preset Preset::builtin(const std::string& name) {
  Preset p;  // the generic defaults: every Linear/Conv/Norm layer
  p.name = name;
  const auto full_unet = cat(cat({"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}, kDiT), {});
  const std::vector<std::string> full_names = {"conv_in", "conv_out", "time_embedding.linear_1",
                                               "time_embedding.linear_2"};
  const auto attn_mlp_unet = cat({"Transformer2DModel"}, kDiT);
  if (name == "full" || name == "unet-only") {
    p.unet_target_module = full_unet;
    p.unet_target_name = full_names;
    if (name == "full") p.text_encoder_target_module = kTE;
  } else if (name == "full-lin") {
    p.enable_conv = false;
    p.unet_target_module = cat({"Transformer2DModel", "ResnetBlock2D"}, kDiT);
    p.unet_target_name = {"time_embedding.linear_1", "time_embedding.linear_2"};
    p.text_encoder_target_module = kTE;
  } else if (name == "attn-mlp" || name == "unet-transformer-only") {
    p.enable_conv = false;
    p.unet_target_module = attn_mlp_unet;
    if (name == "attn-mlp") p.text_encoder_target_module = kTE;
    p.target_module = cat(p.unet_target_module, p.text_encoder_target_module);
  } else if (name == "attn-only") {
    p.enable_conv = false;
    p.unet_target_module = {"CrossAttention", "SelfAttention"};
    p.text_encoder_target_module = kTEAttn;
    p.target_module = cat(p.unet_target_module, p.text_encoder_target_module);
  } else if (name == "unet-convblock-only") {
    p.unet_target_module = {"ResnetBlock2D", "Downsample2D", "Upsample2D"};
    p.unet_target_name = {"conv_in", "conv_out"};
    p.target_module = p.unet_target_module;
    p.target_name = p.unet_target_name;
  } else if (name == "ia3") {
    p.enable_conv = false;
    p.unet_target_name = {"to_k", "to_v", "ff.net.2"};
    p.text_encoder_target_name = {"k_proj", "v_proj", "mlp.fc2"};
    // anywhere in the model (the reference's anchored short names match nothing, docs/loaders.md#q10-ia3-unreachable)
    p.target_module = {};
    p.target_name = {R"(.*\bto_k$)", R"(.*\bto_v$)", R"(.*\bk_proj$)", R"(.*\bv_proj$)"};
    p.name_algo_map = {{R"(.*\bff\.net\.2$)", ModuleOverride{{"train_on_input", true}}},
                       {R"(.*\bmlp\.fc2$)", ModuleOverride{{"train_on_input", true}}}};
  } else {
    std::string known;
    for (const auto& n : builtin_names()) known += (known.empty() ? "" : ", ") + n;
    throw OptionError("unknown preset '" + name + "' (built-ins: " + known + ")");
  }
  return p;
}

// ---------------------------------------------------------------- TOML

namespace {

std::string where_of(const std::string& source, const toml::node& node, const std::string& key) {
  std::ostringstream os;
  os << source;
  if (node.source().begin) os << ":" << node.source().begin.line;
  os << ": key '" << key << "'";
  return os.str();
}

bool read_bool(const toml::node& n, const std::string& where) {
  if (auto v = n.value<bool>(); v && n.is_boolean()) return *v;
  throw OptionError(where + ": expected a boolean");
}

std::string read_string(const toml::node& n, const std::string& where) {
  if (n.is_string()) return *n.value<std::string>();
  throw OptionError(where + ": expected a string");
}

std::vector<std::string> read_strings(const toml::node& n, const std::string& where) {
  const auto* arr = n.as_array();
  if (!arr) throw OptionError(where + ": expected an array of strings");
  std::vector<std::string> out;
  for (const auto& item : *arr) {
    if (!item.is_string()) throw OptionError(where + ": expected an array of strings");
    out.push_back(*item.value<std::string>());
  }
  return out;
}

OverrideMap read_map(const toml::node& n, const std::string& where) {
  const auto* table = n.as_table();
  if (!table) throw OptionError(where + ": expected a table of tables");
  OverrideMap out;
  for (const auto& [k, v] : *table) {
    const std::string entry_where = where + "." + std::string(k.str());
    const auto* entry = v.as_table();
    if (!entry) throw OptionError(entry_where + ": expected a table of options");
    ModuleOverride o;
    for (const auto& [ok, ov] : *entry) {
      const std::string key(ok.str());
      if (ov.is_boolean())
        o.set(key, *ov.value<bool>());
      else if (ov.is_integer())
        o.set(key, *ov.value<int64_t>());
      else if (ov.is_floating_point())
        o.set(key, *ov.value<double>());
      else if (ov.is_string())
        o.set(key, *ov.value<std::string>());
      else
        throw OptionError(entry_where + ": option '" + key + "' must be a boolean, number or string");
    }
    o.validate(entry_where);
    out.emplace_back(std::string(k.str()), std::move(o));
  }
  return out;
}

}  // namespace

Preset Preset::from_toml(const std::string& text, const std::string& source, const Preset& base) {
  toml::table doc;
  try {
    doc = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << source << ":" << e.source().begin.line << ":" << e.source().begin.column << ": " << e.description();
    throw OptionError("preset " + os.str());
  }
  Preset p = base;
  p.name = source;
  for (const auto& [k, node] : doc) {
    const std::string key(k.str());
    const std::string where = "preset " + where_of(source, node, key);
    if (key == "enable_conv")
      p.enable_conv = read_bool(node, where);
    else if (key == "use_fnmatch")
      p.use_fnmatch = read_bool(node, where);
    else if (key == "lora_prefix")
      p.lora_prefix = read_string(node, where);
    else if (key == "target_module")
      p.target_module = read_strings(node, where);
    else if (key == "target_name")
      p.target_name = read_strings(node, where);
    else if (key == "exclude_name")
      p.exclude_name = read_strings(node, where);
    else if (key == "unet_target_module")
      p.unet_target_module = read_strings(node, where);
    else if (key == "unet_target_name")
      p.unet_target_name = read_strings(node, where);
    else if (key == "text_encoder_target_module")
      p.text_encoder_target_module = read_strings(node, where);
    else if (key == "text_encoder_target_name")
      p.text_encoder_target_name = read_strings(node, where);
    else if (key == "module_algo_map")
      p.module_algo_map = read_map(node, where);
    else if (key == "name_algo_map")
      p.name_algo_map = read_map(node, where);
    else
      throw OptionError("preset " + where_of(source, node, key) +
                        ": unknown key (valid: enable_conv, target_module, target_name, module_algo_map, "
                        "name_algo_map, lora_prefix, use_fnmatch, unet_target_module, unet_target_name, "
                        "text_encoder_target_module, text_encoder_target_name, exclude_name)");
  }
  return p;
}

Preset Preset::from_toml_file(const std::string& path, const Preset& base) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw OptionError("preset " + path + ": cannot be read");
  std::stringstream ss;
  ss << in.rdbuf();
  return from_toml(ss.str(), path, base);
}

Preset Preset::from_toml(const std::string& text, const std::string& source) {
  return from_toml(text, source, Preset());
}

Preset Preset::from_toml_file(const std::string& path) { return from_toml_file(path, Preset()); }

Preset Preset::resolve(const std::string& name_or_path) {
  const auto& names = builtin_names();
  if (std::find(names.begin(), names.end(), name_or_path) != names.end()) return builtin(name_or_path);
  if (std::filesystem::exists(name_or_path)) return from_toml_file(name_or_path);
  std::string known;
  for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
  throw OptionError("preset '" + name_or_path + "' is neither a built-in (" + known + ") nor a readable file");
}

}  // namespace lycoris
