// Module naming (docs/format.md#module-names, docs/tools.md#checkpoint-layouts): one home for every naming rule.
//
// An adapter module name is "<prefix>_<path with . → _>". The mapping path → name is not invertible
// (`a.b_c` and `a_b.c` collide), so names are resolved the way every reference loader does it: enumerate
// the base checkpoint's layers, build each layer's names with every naming rule ("dialect"), and look the
// adapter's module names up in that table. Dialects:
//   standalone  "<prefix>_<key path>" for every known prefix (generic wrapper, kohya on diffusers/HF files)
//   diffusers   component-prefixed diffusers files: unet.<p> → lora_unet_/lycoris_, text_encoder.<p> →
//               lora_te_/lora_te1_, text_encoder_2.<p> → lora_te2_
//   sgm         kohya SDXL names (`lora_unet_input_blocks_…`) on a diffusers-layout U-Net (UNetTable)
//   ldm         original checkpoints: model.diffusion_model.<sgm path> (as lora_unet_<sgm path> and as
//               lora_unet_/lycoris_<diffusers path>), cond_stage_model.transformer.<HF path> (lora_te_),
//               cond_stage_model.model.<OpenCLIP path> (lora_te_, HF names), conditioner.embedders.0.
//               transformer.<HF path> (lora_te1_), conditioner.embedders.1.model.<OpenCLIP path> (lora_te2_)
// OpenCLIP stores q/k/v fused in `attn.in_proj_weight` (3d, d): the HF q_proj/k_proj/v_proj names resolve
// to row blocks 0/1/2 of it (BaseLayer::part/parts).
//
// Adapter files name a module after the model part ("component") it belongs to: "model" (a generic model;
// in LyCORIS files also the U-Net or transformer), "unet", "transformer", "te", "te1", "te2", "te3".
//   lycoris, kohya  "<prefix>_<path with . → _>", the prefix given by the component (module_prefixes())
//   peft            "<component prefix><dotted path>.<suffix>" (peft_prefixes(), peft_suffixes())
#pragma once
#include <functional>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lycoris::naming {

// "<prefix>_<path with . → _>"; the root module (empty path) gives "<prefix>_".
std::string module_name(const std::string& prefix, const std::string& path);
// The path with . → _ (what follows the prefix in a module name).
std::string underscored(std::string path);
// Prefixes the reference and kohya write: lycoris, lora_unet, lora_te, lora_te1, lora_te2, lora_te3.
const std::vector<std::string>& known_prefixes();

// ---- adapter file namings

enum class AdapterFormat { Lycoris, Kohya, Peft };
// "lycoris" | "kohya" | "peft" (or "diffusers"); OptionError otherwise.
AdapterFormat parse_adapter_format(const std::string& s);
const char* to_string(AdapterFormat f);

// The LyCORIS/kohya module prefixes (known_prefixes(), same order) and their components.
const std::vector<std::pair<std::string, std::string>>& module_prefixes();
// The prefix a component gets in a LyCORIS/kohya name ("lycoris", "lora_unet", "lora_te1", …); OptionError
// for an unknown component.
std::string component_prefix(const std::string& component, AdapterFormat format);
// The component of a LyCORIS/kohya module name and the rest after "<prefix>_"; {"", name} without a known
// prefix.
std::pair<std::string, std::string> split_module_name(const std::string& name);

// PEFT/diffusers key prefixes and their components: "base_model.model." (model), "unet.", "transformer.",
// "text_encoder_2." (te2), "text_encoder_3." (te3), "text_encoder." (te).
const std::vector<std::pair<std::string, std::string>>& peft_prefixes();
// The component of a PEFT/diffusers key or dotted path and the rest after its prefix; {"", path} without
// one. "text_encoder." is te1 when the same file also has "text_encoder_2." (SDXL), else te.
std::pair<std::string, std::string> split_peft_path(const std::string& path, bool has_te2);
// The key prefix of a component ("base_model.model.", "unet.", "text_encoder.", …).
const std::string& peft_component_prefix(const std::string& component);
// PEFT/diffusers tensor suffix → LyCORIS suffix, longest first ("lora_A.weight" → "lora_down.weight").
const std::vector<std::pair<std::string, std::string>>& peft_suffixes();
// The PEFT suffix `convert --to peft` writes for a LyCORIS suffix (lora_down.weight → lora_A.weight, …;
// LoHa/LoKr suffixes are PEFT's own).
std::string peft_key_suffix(const std::string& lycoris_suffix);
// Whether a key ends in a suffix only PEFT/diffusers files use (lora_A/lora_B, lora.down/lora.up,
// lora_magnitude_vector).
bool peft_only_suffix(const std::string& key);

// A layer of a base checkpoint: a key "<path>.weight" (the root layer's key is plain "weight"), or a row
// block of a fused tensor (OpenCLIP `attn.in_proj_weight`: path "<…>.attn.in_proj").
struct BaseLayer {
  std::string path;        // dotted module path ("" for the root)
  std::string weight_key;  // "<path>.weight"
  std::string bias_key;    // "<path>.bias" when the checkpoint has it, else ""
  // parts > 0: the layer is rows [part·R/parts, (part+1)·R/parts) of weight_key (and of bias_key),
  // R = the tensor's first dimension. parts == 0: the whole tensor.
  int part = 0, parts = 0;
  bool fused() const { return parts > 0; }
};

// The layers of a checkpoint, in key order: one per key ending in ".weight" (or equal to "weight").
std::vector<BaseLayer> base_layers(const std::vector<std::string>& keys);
// The shape a layer has inside its tensor's shape (row block of a fused tensor, else the same).
std::vector<int64_t> layer_shape(const BaseLayer& layer, std::vector<int64_t> tensor_shape);

// One adapter module name given to a base layer by a naming rule.
struct Resolution {
  std::string module;  // the adapter module name
  BaseLayer layer;
  std::string dialect;  // the rule that produced the name, e.g. "standalone"
  std::string prefix;   // the prefix used ("lycoris", "lora_unet", …)
  std::string path;     // the dotted module path as the adapter's naming sees it (diffusers / HF / sgm path)
};

// A naming dialect: emits every adapter module name it gives to the layers of a checkpoint.
struct Dialect {
  std::string name;
  std::function<void(const std::vector<BaseLayer>&, const std::function<void(Resolution)>& emit)> names;
};

// The base checkpoint layout.
enum class BaseFormat { Auto, Diffusers, Ldm };
// "auto" | "diffusers" | "ldm"; OptionError otherwise.
BaseFormat parse_base_format(const std::string& s);
const char* to_string(BaseFormat f);
// Ldm when some key lies under model.diffusion_model. / cond_stage_model. / conditioner.embedders.,
// Diffusers otherwise (any other model, including the diffusers/HF layouts and generic state dicts).
BaseFormat detect_base_format(const std::vector<std::string>& keys);

// Every dialect, in order: standalone, diffusers, sgm, ldm (each emits names only for layers of its layout).
const std::vector<Dialect>& dialects();
// The dialects of one layout. Auto = dialects(); Diffusers = standalone, diffusers, sgm; Ldm = standalone,
// ldm. OptionError when the keys contradict a forced layout (ldm forced on a checkpoint without ldm keys,
// diffusers forced on one with them).
std::vector<Dialect> dialects_for(BaseFormat format, const std::vector<std::string>& keys);

// Adapter module name → base layer, built from a checkpoint's key list.
class Resolver {
 public:
  explicit Resolver(const std::vector<std::string>& base_keys, const std::vector<Dialect>& rules = dialects());
  // The dialects of `format` (dialects_for), e.g. from `--base-format`.
  Resolver(const std::vector<std::string>& base_keys, BaseFormat format);

  // Every base layer this module name denotes: empty when none, more than one when ambiguous (colliding
  // paths such as `a.b_c` / `a_b.c`; the caller decides, the loader reports it as an error).
  std::vector<const Resolution*> find(const std::string& module) const;
  // Up to n known names closest to `module` (edit distance), for "matches nothing" messages.
  std::vector<std::string> closest(const std::string& module, size_t n = 3) const;
  // Every (name, layer) pair known, in no particular order.
  std::vector<const Resolution*> all() const;
  size_t size() const { return by_name_.size(); }
  const std::vector<BaseLayer>& layers() const { return layers_; }

 private:
  std::vector<BaseLayer> layers_;
  std::unordered_map<std::string, std::vector<Resolution>> by_name_;
};

// ---- U-Net block structure: diffusers ↔ ldm (SGM) module paths, generated from the block layout

struct UNetConfig {
  std::string name;            // "sd" (SD1.x/SD2.x) or "sdxl"
  int levels = 4;              // down/up block count
  int layers_per_block = 2;    // resnets per down block (up blocks have one more)
  std::vector<bool> attention; // per down level: has transformer blocks
  bool add_embedding = false;  // SDXL class/size embedding (add_embedding ↔ label_emb)
};
const UNetConfig& sd_unet_config();    // levels 4, attention on levels 0–2
const UNetConfig& sdxl_unet_config();  // levels 3, attention on levels 1–2

// Module paths relative to the U-Net (diffusers) / to model.diffusion_model. (ldm). Resnet sub-layers
// are renamed (norm1 ↔ in_layers.0, conv1 ↔ in_layers.2, time_emb_proj ↔ emb_layers.1, norm2 ↔
// out_layers.0, conv2 ↔ out_layers.3, conv_shortcut ↔ skip_connection); inside attention blocks the
// names are identical.
class UNetTable {
 public:
  explicit UNetTable(const UNetConfig& config);
  std::optional<std::string> to_ldm(const std::string& diffusers_path) const;
  std::optional<std::string> to_diffusers(const std::string& ldm_path) const;
  // The generated (diffusers, ldm) pairs: resnet sub-layers, samplers and single layers are whole
  // paths; attention blocks are path prefixes.
  const std::vector<std::pair<std::string, std::string>>& entries() const { return entries_; }
  const UNetConfig& config() const { return config_; }

 private:
  UNetConfig config_;
  std::vector<std::pair<std::string, std::string>> entries_;
  std::unordered_map<std::string, std::string> d2l_, l2d_;
};
// The table of the preset config that maps the most of `paths` (diffusers paths, or ldm paths when
// `ldm`); nullptr when none maps any.
const UNetTable* unet_table_for(const std::vector<std::string>& paths, bool ldm);
const UNetTable& sd_unet_table();
const UNetTable& sdxl_unet_table();

// ---- text encoders: OpenCLIP (ldm SD2 TE, SDXL TE2) ↔ HF CLIP paths

// HF path(s) of an OpenCLIP module path (relative to cond_stage_model.model. / conditioner.embedders.1.
// model.): `transformer.resblocks.N.attn.in_proj` gives three (q_proj, k_proj, v_proj: parts 0, 1, 2 of 3).
std::vector<std::string> openclip_to_hf(const std::string& openclip_path);
// OpenCLIP path of an HF path and the part (−1 = whole tensor, else 0/1/2 of the fused in_proj).
std::optional<std::pair<std::string, int>> hf_to_openclip(const std::string& hf_path);

// A dotted path guessed from an underscored one without a base model (e.g. "down_blocks_0_attentions_0_
// proj_in" → "down_blocks.0.attentions.0.proj_in"): greedy longest match of the multi-word identifiers
// of the SD/SDXL/Flux/CLIP module trees, every other '_' becomes '.'. Exact for those models; a guess
// for others (pass a base to convert/check for exact paths).
std::string guess_path(const std::string& underscored);

}  // namespace lycoris::naming
