// How LyCORIS, kohya and PEFT/diffusers adapter files name modules (see include/lycoris/naming.hpp).
#include <algorithm>
#include <map>

#include "lycoris/error.hpp"
#include "lycoris/naming.hpp"
#include "lycoris/text.hpp"

namespace lycoris::naming {

namespace {
constexpr EnumName<AdapterFormat> kAdapterFormats[] = {{AdapterFormat::Lycoris, "lycoris"},
                                                       {AdapterFormat::Kohya, "kohya"},
                                                       {AdapterFormat::Peft, "peft"},
                                                       {AdapterFormat::Peft, "diffusers"}};
}  // namespace

AdapterFormat parse_adapter_format(const std::string& s) {
  AdapterFormat f;
  std::string known;
  if (!parse_enum(kAdapterFormats, s, f, &known))
    throw OptionError("unknown adapter format '" + escape_control(s) + "' (" + known + ")");
  return f;
}

const char* to_string(AdapterFormat f) { return enum_name(kAdapterFormats, f); }

const std::vector<std::pair<std::string, std::string>>& module_prefixes() {
  static const std::vector<std::pair<std::string, std::string>> p = {
      {"lycoris", "model"}, {"lora_unet", "unet"}, {"lora_te", "te"},
      {"lora_te1", "te1"},  {"lora_te2", "te2"},   {"lora_te3", "te3"},
  };
  return p;
}

const std::vector<std::string>& known_prefixes() {
  static const std::vector<std::string> prefixes = [] {
    std::vector<std::string> v;
    for (const auto& [p, c] : module_prefixes()) v.push_back(p);
    return v;
  }();
  return prefixes;
}

std::string component_prefix(const std::string& component, AdapterFormat format) {
  if (component == "te") return "lora_te";
  if (component == "te1" || component == "te2" || component == "te3") return "lora_" + component;
  if (component == "model" || component == "unet" || component == "transformer")
    return format == AdapterFormat::Lycoris ? "lycoris" : "lora_unet";
  throw OptionError("unknown module component '" + component + "'");
}

std::pair<std::string, std::string> split_module_name(const std::string& name) {
  // "<prefix>_" tells lora_te_ from lora_te1_: no prefix shadows another
  for (const auto& [p, c] : module_prefixes())
    if (name.size() > p.size() && starts_with(name, p + "_")) return {c, name.substr(p.size() + 1)};
  if (name == "lycoris_") return {"model", ""};
  return {"", name};
}

const std::vector<std::pair<std::string, std::string>>& peft_prefixes() {
  static const std::vector<std::pair<std::string, std::string>> p = {
      {"base_model.model.", "model"}, {"unet.", "unet"},           {"transformer.", "transformer"},
      {"text_encoder_2.", "te2"},     {"text_encoder_3.", "te3"}, {"text_encoder.", "te"},
  };
  return p;
}

std::pair<std::string, std::string> split_peft_path(const std::string& path, bool has_te2) {
  for (const auto& [p, c] : peft_prefixes())
    if (starts_with(path, p)) return {(c == "te" && has_te2) ? "te1" : c, path.substr(p.size())};
  return {"", path};
}

const std::string& peft_component_prefix(const std::string& component) {
  static const std::map<std::string, std::string> p = [] {
    std::map<std::string, std::string> m;
    for (const auto& [prefix, c] : peft_prefixes()) m[c] = prefix;
    m["te1"] = m.at("te");  // SDXL's first text encoder
    return m;
  }();
  return p.at(component);
}

const std::vector<std::pair<std::string, std::string>>& peft_suffixes() {
  static const std::vector<std::pair<std::string, std::string>> s = [] {
    std::vector<std::pair<std::string, std::string>> v = {
        {"lora_A.default.weight", "lora_down.weight"}, {"lora_B.default.weight", "lora_up.weight"},
        {"lora_magnitude_vector.weight", "dora_scale"}, {"lora_magnitude_vector", "dora_scale"},
        {"lora_A.weight", "lora_down.weight"},         {"lora_B.weight", "lora_up.weight"},
        {"lora.down.weight", "lora_down.weight"},      {"lora.up.weight", "lora_up.weight"},
        {"lora_down.weight", "lora_down.weight"},      {"lora_up.weight", "lora_up.weight"},
        {"alpha", "alpha"},
    };
    for (const char* k : {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
                          "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})
      v.emplace_back(k, k);
    // longest first: "lora_A.default.weight" is tried before "lora_A.weight"
    std::stable_sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    return v;
  }();
  return s;
}

std::string peft_key_suffix(const std::string& lycoris_suffix) {
  if (lycoris_suffix == "lora_down.weight") return "lora_A.weight";
  if (lycoris_suffix == "lora_up.weight") return "lora_B.weight";
  if (lycoris_suffix == "dora_scale") return "lora_magnitude_vector";  // (O,) for Linear, (1, O, 1, …) for convs
  return lycoris_suffix;
}

bool peft_only_suffix(const std::string& key) {
  for (const char* s : {".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight",
                        ".lora.down.weight", ".lora.up.weight", ".lora_magnitude_vector",
                        ".lora_magnitude_vector.weight"})
    if (ends_with(key, s)) return true;
  return false;
}

}  // namespace lycoris::naming
