// `lycoris convert`: rewrite an adapter file between the LyCORIS, kohya and PEFT/diffusers namings
// without changing any module's ΔW (docs/tools.md#convert; naming rules in include/lycoris/naming.hpp).
//
// Formats (module "component" = which model part it belongs to):
//   lycoris  "lycoris_<path>" for the main model (U-Net / transformer / generic), "lora_te*_<path>" for text
//            encoders; LyCORIS suffixes (lora_up/lora_down/alpha, hada_*, lokr_*, …). Every algorithm.
//   kohya    "lora_unet_<path>", "lora_te_" / "lora_te1_" / "lora_te2_"; same suffixes. Every algorithm (the
//            names LyCORIS's kohya integration writes and ComfyUI/sd-webui read).
//   peft     "<component>.<dotted path>.<suffix>" with component base_model.model (generic model), unet,
//            transformer, text_encoder, text_encoder_2; LoRA as lora_A.weight / lora_B.weight, DoRA as
//            lora_magnitude_vector, LoHa/LoKr with LyCORIS tensor names. PEFT keeps alpha in its config,
//            not in the file: on writing, the scale alpha/r is folded into lora_B / hada_w1_a / lokr_w1
//            (scale 1 = PEFT's default lora_alpha = r); on reading, alpha comes from "<path>.alpha", else from
//            adapter_config.json next to the file (lora_alpha, r, alpha_pattern, rank_pattern, use_rslora),
//            else alpha = r. Algorithms PEFT cannot express in these files are refused: (IA)^3, Full, Norm,
//            Diag-OFT, BOFT, GLoRA, GLoKr, LoRA with a Tucker core (lora_mid), DoRA on the input axis or on
//            LoHa/LoKr.
// Dotted paths (needed for PEFT) come from the PEFT input itself, else from --base (exact, through the
// naming dialects), else from naming::guess_path (exact for SD/SDXL/CLIP names; reported as guessed).
// PEFT U-Net paths are diffusers paths: kohya SDXL (SGM) names are mapped through the U-Net table.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "lycoris/adapter.hpp"
#include "lycoris/naming.hpp"

namespace lycoris::tools {

// The namings themselves live with the other naming rules.
using naming::AdapterFormat;
using naming::parse_adapter_format;
using naming::to_string;

// One module of an adapter file, independent of its naming.
struct NamedModule {
  std::string name;         // the module name as written in the file (PEFT: "<component>.<path>")
  std::string component;    // "model", "unet", "transformer", "te", "te1", "te2", "te3"; "" = unknown prefix
  std::string underscored;  // the path with . → _ (what follows the prefix in LyCORIS/kohya names)
  std::string path;         // dotted path; "" when not known (LyCORIS/kohya names read without a base)
  TensorMap tensors;        // LyCORIS suffixes (PEFT names already translated; alpha as in the file)
};

struct AdapterContents {
  std::string path;
  AdapterFormat format = AdapterFormat::Lycoris;
  std::vector<NamedModule> modules;  // in name order
  std::vector<std::string> stray_keys;  // tensors outside any module (keys without '.')
  size_t tensors = 0;                   // tensors in the file
  std::map<std::string, std::string> metadata;
  std::vector<std::string> notes;    // where alphas came from etc.
};

// Reads an adapter file in any of the three namings (detected from its keys). FormatError for a file
// mixing LyCORIS and PEFT names or a PEFT key with an unknown suffix.
AdapterContents read_adapter(const std::string& path);

using naming::component_prefix;
using naming::split_module_name;

struct ConvertOptions {
  AdapterFormat to = AdapterFormat::Lycoris;
  std::string base;  // optional base checkpoint: exact dotted paths for LyCORIS/kohya names
  naming::BaseFormat base_format = naming::BaseFormat::Auto;
};

struct ConvertReport {
  AdapterFormat from = AdapterFormat::Lycoris;
  size_t modules = 0, tensors = 0;
  size_t guessed_paths = 0;  // dotted paths guessed without a base
  size_t folded = 0;         // modules whose alpha/r was folded into the weights
  std::vector<std::string> warnings;
};

// Converts `input` to `options.to` and writes `output` atomically. Throws OptionError (with every
// offending module) when the target cannot express a module, KeyError for names that match nothing in
// --base, FormatError/IOError for files.
ConvertReport convert(const std::string& input, const std::string& output, const ConvertOptions& options);

}  // namespace lycoris::tools
