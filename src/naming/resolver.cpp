// Naming rules and the name → base layer resolver (see include/lycoris/naming.hpp). The diffusers ↔ ldm
// and OpenCLIP ↔ HF tables live in tables.cpp.
#include "lycoris/naming.hpp"

#include <algorithm>
#include <unordered_set>

#include "lycoris/error.hpp"
#include "lycoris/text.hpp"

namespace lycoris::naming {

std::string underscored(std::string path) {
  std::replace(path.begin(), path.end(), '.', '_');
  return path;
}

std::string module_name(const std::string& prefix, const std::string& path) { return prefix + "_" + underscored(path); }

namespace {

// Checkpoint key prefixes of the original (ldm/sgm) layout.
const char* const kUNet = "model.diffusion_model.";
const char* const kTE = "cond_stage_model.transformer.";         // SD1: HF CLIP
const char* const kOpenCLIP = "cond_stage_model.model.";         // SD2: OpenCLIP
const char* const kTE1 = "conditioner.embedders.0.transformer.";  // SDXL TE1: HF CLIP
const char* const kTE2 = "conditioner.embedders.1.model.";        // SDXL TE2: OpenCLIP

bool is_ldm_key(const std::string& key) {
  return starts_with(key, kUNet) || starts_with(key, "cond_stage_model.") || starts_with(key, "conditioner.embedders.");
}

// The OpenCLIP fused attention input projection: "<…>.attn.in_proj_weight" (a parameter, not a module).
const std::string kInProj = ".in_proj_weight";

}  // namespace

std::vector<BaseLayer> base_layers(const std::vector<std::string>& keys) {
  static const std::string suffix = ".weight";
  std::unordered_set<std::string> all(keys.begin(), keys.end());
  std::vector<BaseLayer> layers;
  for (const auto& key : keys) {
    std::string path;
    if (key == "weight") {
      path = "";
    } else if (key.size() > suffix.size() && ends_with(key, suffix)) {
      path = key.substr(0, key.size() - suffix.size());
    } else {
      continue;
    }
    const std::string bias = path.empty() ? "bias" : path + ".bias";
    layers.push_back({path, key, all.count(bias) ? bias : ""});
  }
  return layers;
}

std::vector<int64_t> layer_shape(const BaseLayer& layer, std::vector<int64_t> shape) {
  if (layer.fused() && !shape.empty()) {
    if (shape[0] % layer.parts != 0)
      throw ShapeError(layer.weight_key + ": first dimension " + std::to_string(shape[0]) +
                       " is not divisible into " + std::to_string(layer.parts) + " fused parts");
    shape[0] /= layer.parts;
  }
  return shape;
}

namespace {
constexpr EnumName<BaseFormat> kBaseFormats[] = {
    {BaseFormat::Auto, "auto"}, {BaseFormat::Diffusers, "diffusers"}, {BaseFormat::Ldm, "ldm"}};
}  // namespace

BaseFormat parse_base_format(const std::string& s) {
  BaseFormat f;
  std::string known;
  if (!parse_enum(kBaseFormats, s, f, &known))
    throw OptionError("unknown base layout '" + escape_control(s) + "' (" + known + ")");
  return f;
}

const char* to_string(BaseFormat f) { return enum_name(kBaseFormats, f); }

BaseFormat detect_base_format(const std::vector<std::string>& keys) {
  for (const auto& k : keys)
    if (is_ldm_key(k)) return BaseFormat::Ldm;
  return BaseFormat::Diffusers;
}

namespace {

using Emit = std::function<void(Resolution)>;

bool is_whole(const BaseLayer& l) { return !l.fused(); }

Dialect standalone_dialect() {
  // The reference's own rule (generic wrapper, kohya on diffusers/HF layouts, extract/merge tools).
  return {"standalone", [](const std::vector<BaseLayer>& layers, const Emit& emit) {
            for (const auto& layer : layers)
              if (is_whole(layer))
                for (const auto& prefix : known_prefixes())
                  emit({module_name(prefix, layer.path), layer, "standalone", prefix, layer.path});
          }};
}

// Diffusers pipelines saved as one file: the PEFT/diffusers component prefixes name the model part, whose
// modules kohya and LyCORIS name lora_unet_/lycoris_ (U-Net, transformer) and lora_te*_ (text encoders;
// a lone text encoder also as SDXL's first).
Dialect diffusers_dialect() {
  return {"diffusers", [](const std::vector<BaseLayer>& layers, const Emit& emit) {
            bool has_te2 = false;
            for (const auto& l : layers) has_te2 |= starts_with(l.path, peft_component_prefix("te2"));
            for (const auto& layer : layers) {
              if (!is_whole(layer)) continue;
              const auto [component, rest] = split_peft_path(layer.path, has_te2);
              std::vector<std::string> prefixes;
              if (component == "unet" || component == "transformer")
                prefixes = {component_prefix(component, AdapterFormat::Kohya),
                            component_prefix(component, AdapterFormat::Lycoris)};
              else if (component == "te")
                prefixes = {component_prefix("te", AdapterFormat::Kohya), component_prefix("te1", AdapterFormat::Kohya)};
              else if (component == "te1" || component == "te2" || component == "te3")
                prefixes = {component_prefix(component, AdapterFormat::Kohya)};
              for (const auto& p : prefixes) emit({module_name(p, rest), layer, "diffusers", p, rest});
            }
          }};
}

// kohya's SDXL names use SGM paths; on a diffusers-layout U-Net they are found through the table.
Dialect sgm_dialect() {
  return {"sgm", [](const std::vector<BaseLayer>& layers, const Emit& emit) {
            std::vector<std::string> paths;
            for (const auto& l : layers) {
              if (starts_with(l.path, "unet.")) paths.push_back(l.path.substr(5));
              else if (!is_ldm_key(l.weight_key)) paths.push_back(l.path);
            }
            const UNetTable* table = unet_table_for(paths, false);
            if (!table) return;
            for (const auto& layer : layers) {
              if (!is_whole(layer) || is_ldm_key(layer.weight_key)) continue;
              const std::string p = starts_with(layer.path, "unet.") ? layer.path.substr(5) : layer.path;
              if (auto sgm = table->to_ldm(p)) emit({module_name("lora_unet", *sgm), layer, "sgm", "lora_unet", *sgm});
            }
          }};
}

// Original checkpoints (docs/tools.md#checkpoint-layouts).
Dialect ldm_dialect() {
  return {"ldm", [](const std::vector<BaseLayer>& layers, const Emit& emit) {
            std::vector<std::string> unet_paths;
            for (const auto& l : layers)
              if (starts_with(l.path, kUNet)) unet_paths.push_back(l.path.substr(std::string(kUNet).size()));
            const UNetTable* table = unet_table_for(unet_paths, true);
            for (const auto& layer : layers) {
              const auto& path = layer.path;
              auto put = [&](const std::string& prefix, const std::string& p, const char* dialect) {
                emit({module_name(prefix, p), layer, dialect, prefix, p});
              };
              if (starts_with(path, kUNet)) {
                const auto sgm = path.substr(std::string(kUNet).size());
                put("lora_unet", sgm, "ldm-sgm");  // kohya SDXL names = SGM paths
                if (table)
                  if (auto d = table->to_diffusers(sgm)) {  // kohya SD1/SD2 and SimpleTuner names = diffusers paths
                    put("lora_unet", *d, "ldm");
                    put("lycoris", *d, "ldm");
                  }
              } else if (starts_with(path, kTE)) {
                auto hf = path.substr(std::string(kTE).size());
                if (!starts_with(hf, "text_model.")) hf = "text_model." + hf;  // pre-4.x transformers layout
                put("lora_te", hf, "ldm");
              } else if (starts_with(path, kTE1)) {
                auto hf = path.substr(std::string(kTE1).size());
                if (!starts_with(hf, "text_model.")) hf = "text_model." + hf;
                put("lora_te1", hf, "ldm");
              } else {
                const bool sd2 = starts_with(path, kOpenCLIP), te2 = starts_with(path, kTE2);
                if (!sd2 && !te2) continue;
                const auto oc = path.substr(std::string(sd2 ? kOpenCLIP : kTE2).size());
                const auto hf = openclip_to_hf(oc);
                for (size_t i = 0; i < hf.size(); ++i) {
                  BaseLayer l = layer;
                  if (hf.size() > 1) {
                    l.part = static_cast<int>(i);
                    l.parts = static_cast<int>(hf.size());
                  }
                  const std::string prefix = sd2 ? "lora_te" : "lora_te2";
                  emit({module_name(prefix, hf[i]), l, "ldm-openclip", prefix, hf[i]});
                }
              }
            }
          }};
}

}  // namespace

const std::vector<Dialect>& dialects() {
  static const std::vector<Dialect> all = {standalone_dialect(), diffusers_dialect(), sgm_dialect(), ldm_dialect()};
  return all;
}

std::vector<Dialect> dialects_for(BaseFormat format, const std::vector<std::string>& keys) {
  const auto& all = dialects();
  if (format == BaseFormat::Auto) return all;
  const bool ldm = detect_base_format(keys) == BaseFormat::Ldm;
  if (format == BaseFormat::Ldm && !ldm)
    throw OptionError("base layout 'ldm' forced, but the checkpoint has no key under model.diffusion_model., "
                      "cond_stage_model. or conditioner.embedders. (use auto or diffusers)");
  if (format == BaseFormat::Diffusers && ldm)
    throw OptionError("base layout 'diffusers' forced, but the checkpoint has original (ldm) keys such as "
                      "model.diffusion_model.… (use auto or ldm)");
  std::vector<Dialect> out;
  for (const auto& d : all) {
    const bool keep = d.name == "standalone" || (format == BaseFormat::Ldm ? d.name == "ldm" : d.name != "ldm");
    if (keep) out.push_back(d);
  }
  return out;
}

Resolver::Resolver(const std::vector<std::string>& base_keys, const std::vector<Dialect>& rules)
    : layers_(base_layers(base_keys)) {
  // fused OpenCLIP q/k/v projections are layers too (only the ldm dialect names their row blocks)
  std::unordered_set<std::string> all(base_keys.begin(), base_keys.end());
  for (const auto& key : base_keys)
    if (ends_with(key, kInProj)) {
      const auto stem = key.substr(0, key.size() - kInProj.size());
      const auto bias = stem + ".in_proj_bias";
      layers_.push_back({stem + ".in_proj", key, all.count(bias) ? bias : "", 0, 0});
    }
  for (const auto& rule : rules)
    rule.names(layers_, [&](Resolution r) {
      auto& list = by_name_[r.module];
      // the same layer reached twice (two rules agreeing) is one match, not an ambiguity
      for (const auto& existing : list)
        if (existing.layer.weight_key == r.layer.weight_key && existing.layer.part == r.layer.part) return;
      list.push_back(std::move(r));
    });
}

Resolver::Resolver(const std::vector<std::string>& base_keys, BaseFormat format)
    : Resolver(base_keys, dialects_for(format, base_keys)) {}

std::vector<const Resolution*> Resolver::find(const std::string& module) const {
  std::vector<const Resolution*> out;
  auto it = by_name_.find(module);
  if (it != by_name_.end())
    for (const auto& r : it->second) out.push_back(&r);
  return out;
}

std::vector<const Resolution*> Resolver::all() const {
  std::vector<const Resolution*> out;
  for (const auto& kv : by_name_)
    for (const auto& r : kv.second) out.push_back(&r);
  return out;
}

namespace {
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}
}  // namespace

std::vector<std::string> Resolver::closest(const std::string& module, size_t n) const {
  std::vector<std::pair<size_t, std::string>> scored;
  scored.reserve(by_name_.size());
  for (const auto& kv : by_name_) scored.emplace_back(edit_distance(module, kv.first), kv.first);
  const size_t k = std::min(n, scored.size());
  std::partial_sort(scored.begin(), scored.begin() + static_cast<std::ptrdiff_t>(k), scored.end());
  std::vector<std::string> out;
  for (size_t i = 0; i < k; ++i) out.push_back(scored[i].second);
  return out;
}

}  // namespace lycoris::naming
