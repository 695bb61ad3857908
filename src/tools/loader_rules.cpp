// The loader rule tables (include/lycoris/tools/loader_rules.hpp): one table per program, data only. Each rule
// names the file it was read from; `verified = false` marks rules taken from the survey in docs/loaders.md that
// could not be re-read in the loader's current code. The matrix they give: docs/loaders.md#matrix.
#include "lycoris/tools/loader_rules.hpp"

#include <algorithm>

#include "lycoris/error.hpp"
#include "lycoris/text.hpp"

namespace lycoris::tools {

namespace {

constexpr bool kSurvey = false;  // a rule taken from docs/loaders.md, not re-read in the loader's code
using V = Verdict;

// ComfyUI: comfy/weight_adapter/*.py, behaviour confirmed by running it on tests/data/golden (early 2026).
LoaderTable comfyui() {
  const std::string lora = "comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight";
  const std::string loha = "comfy/weight_adapter/loha.py LoHaAdapter.calculate_weight";
  const std::string lokr = "comfy/weight_adapter/lokr.py LoKrAdapter.calculate_weight";
  const std::string dora = "comfy/weight_adapter/base.py weight_decompose";
  const std::string oft = "comfy/weight_adapter/oft.py OFTAdapter.calculate_weight";
  const std::string boft = "comfy/weight_adapter/boft.py BOFTAdapter.calculate_weight";
  return {"comfyui", "ComfyUI", "master, early 2026", "comfyanonymous/ComfyUI",
          {"lora", "loha", "lokr", "glora", "diag-oft", "boft", "norm", "full"},
          {"*", {}, {}, V::Ignored, false, "no adapter",
           "no weight adapter reads these keys: logged 'lora key not loaded', the layer is left unchanged",
           "comfy/lora.py load_lora; comfy/weight_adapter/__init__.py (adapters)"},
          {
              {"*", {"tucker", "conv1d"}, {}, V::Refused, false, "Tucker on Conv1d",
               "the Tucker path handles 4-D kernels only: the exception is raised outside its try block and the "
               "whole model load stops", lora + "; " + loha + "; " + lokr},
              {"*", {"tucker", "conv3d"}, {}, V::Refused, false, "Tucker on Conv3d",
               "the Tucker path handles 4-D kernels only (einsum 'i j k l' / a 4-entry reshape): the load stops",
               lora + "; " + loha + "; " + lokr},
              {"lokr", {"tucker", "conv2d"}, {}, V::Refused, false, "LoKr Tucker on Conv2d",
               "torch.kron rejects the einsum result (torch 1.13): an error is logged, the weight left unpatched",
               lokr},
              {"lokr", {"lokr-w2-whole-kernel"}, {"conv2d"}, V::Differs, false, "LoKr whole lokr_w2 on Conv1d/3d",
               "w1 gets the kernel axes only when lokr_w2 is 4-D: the Kronecker product puts values in the wrong "
               "places", lokr},
              {"lokr", {"lokr-ranks-differ"}, {}, V::Differs, false, "LoKr scale rank",
               "scale alpha / rank of lokr_w2_b (we: of lokr_w1_b)", lokr},
              {"*", {"dora-out"}, {}, V::Differs, false, "DoRA norm",
               "normalises by the row norm of W instead of W + ΔW", dora},
              {"*", {"dora"}, {}, V::Differs, true, "DoRA strength",
               "at strength s: W + s·(W_DoRA − W) instead of (W + ΔW)·(s·(g − 1) + 1)", dora},
              {"diag-oft", {}, {}, V::Differs, true, "Diag-OFT strength",
               "strength applied twice: W + s²·(R − I)ᵀW", oft},
              {"diag-oft", {"rescale"}, {}, V::Differs, false, "Diag-OFT rescale",
               "rescale is loaded but never applied", oft},
              {"diag-oft", {"constraint-below-q"}, {}, V::Differs, false, "OFT constraint",
               "clips ‖Q‖ at alpha instead of alpha·out_features", oft},
              {"boft", {"constraint-below-q"}, {}, V::Differs, false, "BOFT constraint",
               "clips ‖Q‖ at alpha instead of alpha·out_features", boft},
              {"boft", {}, {}, V::Differs, true, "BOFT strength",
               "strength applied per butterfly stage and then once more on the difference", boft},
              {"*", {"sparse-bias"}, {}, V::Differs, false, "sparse bias",
               "bias_indices/bias_values are not read ('lora key not loaded'): the residual is missing", lora},
          }};
}

// AUTOMATIC1111 sd-webui (and Forge): extensions-builtin/Lora, 1.10.
LoaderTable sdwebui() {
  const std::string dir = "extensions-builtin/Lora/";
  return {"sdwebui", "sd-webui (A1111/Forge)", "1.10", "AUTOMATIC1111/stable-diffusion-webui",
          {"lora", "loha", "lokr", "full", "ia3", "norm", "glora", "diag-oft", "boft"},
          {"*", {}, {}, V::Refused, false, "no module type",
           "no module type accepts the keys: AssertionError, the whole network fails to load",
           dir + "networks.py load_network", kSurvey},
          {
              {"lora", {"conv1d"}, {}, V::Refused, false, "LoRA on Conv1d",
               "LoRA modules only for Linear, MultiheadAttention and Conv2d: AssertionError 'unsupported type'",
               dir + "network_lora.py NetworkModuleLora.create_module"},
              {"lora", {"conv3d"}, {}, V::Refused, false, "LoRA on Conv3d",
               "LoRA modules only for Linear, MultiheadAttention and Conv2d: AssertionError 'unsupported type'",
               dir + "network_lora.py NetworkModuleLora.create_module"},
              {"*", {"tucker", "conv1d"}, {}, V::Refused, false, "Tucker on Conv1d",
               "the Tucker rebuild is a 4-D einsum: RuntimeError, the layer is skipped",
               dir + "lyco_helpers.py make_weight_cp, rebuild_cp_decomposition"},
              {"*", {"tucker", "conv3d"}, {}, V::Refused, false, "Tucker on Conv3d",
               "the Tucker rebuild is a 4-D einsum: RuntimeError, the layer is skipped",
               dir + "lyco_helpers.py make_weight_cp, rebuild_cp_decomposition"},
              {"lokr", {"lokr-w2-whole-kernel"}, {"conv2d"}, V::Refused, false, "LoKr whole lokr_w2 on Conv1d/3d",
               "w1 gets kernel axes only for a 4-D lokr_w2: the product does not reshape to the weight "
               "(RuntimeError, the layer is skipped)", dir + "network_lokr.py make_kron"},
              {"lokr", {"lokr-ranks-differ"}, {}, V::Differs, false, "LoKr scale rank",
               "scale alpha / rank of lokr_w2_b (we: of lokr_w1_b)", dir + "network_lokr.py NetworkModuleLokr"},
              {"*", {"dora-out"}, {}, V::Differs, false, "DoRA axis",
               "always normalises per input column (LyCORIS < 3.2): dora_scale (out, 1, …) broadcasts against the "
               "wrong norms", dir + "network.py NetworkModule.apply_weight_decompose", kSurvey},
              {"*", {"dora"}, {}, V::Differs, true, "DoRA strength",
               "at strength s: W + s·(W_DoRA − W) instead of (W + ΔW)·(s·(g − 1) + 1)",
               dir + "network.py NetworkModule.finalize_updown", kSurvey},
              {"glora", {}, {}, V::Refused, false, "GLoRA layout",
               "reads the old layout (b2·b1 + W·a2·a1): current files fail with a shape error; alpha ignored",
               dir + "network_glora.py", kSurvey},
              {"diag-oft", {"rescale"}, {}, V::Differs, true, "OFT rescale strength",
               "the multiplier scales the final ΔW (rescale included) linearly", dir + "network_oft.py", kSurvey},
              {"boft", {}, {}, V::Differs, true, "BOFT strength",
               "the multiplier scales the final ΔW linearly (we interpolate every stage)", dir + "network_oft.py",
               kSurvey},
              {"ia3", {}, {"linear"}, V::Refused, false, "(IA)^3 on a conv",
               "the conv vector (1, C, 1, …) is not broadcast against the weight", dir + "network_ia3.py", kSurvey},
              {"norm", {"no-b-norm"}, {}, V::Refused, false, "Norm without b_norm",
               "the Norm module type needs both w_norm and b_norm", dir + "network_norm.py", kSurvey},
              {"*", {"sparse-bias"}, {}, V::Differs, false, "sparse bias",
               "bias_indices/bias_values are not read: the residual is missing", dir + "network_lora.py"},
          }};
}

// stable-diffusion.cpp: lora.hpp (the version with LoKr support, 2025).
LoaderTable sdcpp() {
  return {"sdcpp", "stable-diffusion.cpp", "master, 2025 (LoKr support)", "leejet/stable-diffusion.cpp",
          {"lora", "loha", "lokr", "full"},
          {"*", {}, {}, V::Ignored, false, "not implemented",
           "no such adapter: the tensors are reported as unused, the layer is left unchanged", "lora.hpp",
           kSurvey},
          {
              {"*", {"dora"}, {}, V::Differs, false, "DoRA", "dora_scale is not applied (plain ΔW)", "lora.hpp",
               kSurvey},
              {"lokr", {"tucker"}, {}, V::Ignored, false, "LoKr Tucker", "modules with lokr_t2 are left unused",
               "lora.hpp", kSurvey},
              {"lokr", {"lokr-rank1-alpha"}, {}, V::Differs, false, "rank-1 LoKr", "scale 1 for rank 1 (we: alpha / 1)",
               "lora.hpp", kSurvey},
              {"lokr", {"lokr-w2-whole-kernel"}, {}, V::Differs, false, "LoKr whole lokr_w2 on a conv",
               "its per-dimension Kronecker product puts lokr_w1 on the kernel dimensions", "lora.hpp", kSurvey},
              {"*", {"sparse-bias"}, {}, V::Differs, false, "sparse bias",
               "bias_indices/bias_values are not read: the residual is missing", "lora.hpp", kSurvey},
          }};
}

// kohya sd-scripts: networks/lora.py (create_network_from_weights, merge scripts).
LoaderTable kohya() {
  const std::string lora = "networks/lora.py create_network_from_weights, LoRAModule";
  return {"kohya", "kohya sd-scripts", "v0.9 (networks/lora.py)", "kohya-ss/sd-scripts",
          {"lora"},
          {"*", {}, {}, V::Ignored, false, "LoRA only",
           "only modules with lora_down/lora_up are created; the other keys are not loaded", lora, kSurvey},
          {
              {"lora", {"tucker"}, {}, V::Refused, false, "LoRA Tucker",
               "no lora_mid: the conv module is built from lora_down's kernel and the state dict does not fit",
               lora, kSurvey},
              {"lora", {"conv-up-2d"}, {}, V::Refused, false, "2-D conv lora_up",
               "a conv lora_up must be (out, r, 1, 1): the state dict does not fit", lora, kSurvey},
              {"lora", {"conv1d"}, {}, V::Ignored, false, "LoRA on Conv1d",
               "LoRA modules only for Linear and Conv2d layers", lora, kSurvey},
              {"lora", {"conv3d"}, {}, V::Ignored, false, "LoRA on Conv3d",
               "LoRA modules only for Linear and Conv2d layers", lora, kSurvey},
              {"*", {"dora"}, {}, V::Differs, false, "DoRA", "dora_scale is not read (plain ΔW)", lora, kSurvey},
              {"*", {"sparse-bias"}, {}, V::Differs, false, "sparse bias",
               "bias_indices/bias_values are not read: the residual is missing", lora, kSurvey},
          }};
}

// PEFT / diffusers, reading what `lycoris convert --to peft` writes (tuners/lora, tuners/loha, tuners/lokr,
// tuners/lycoris_utils.py).
LoaderTable peft() {
  return {"peft", "PEFT / diffusers", "0.13", "huggingface/peft",
          {"lora", "loha", "lokr"},
          {"*", {}, {}, V::Refused, false, "no PEFT form",
           "PEFT has no file-compatible adapter: `convert --to peft` refuses the module (its IA3 is multiplicative, "
           "OFT/BOFT packed, GLoRA another algorithm)", "src/peft/tuners/ (ia3, oft, boft)"},
          {
              {"lora", {"tucker"}, {}, V::Refused, false, "LoRA Tucker", "PEFT LoRA has no mid factor",
               "src/peft/tuners/lora/layer.py"},
              {"*", {"dora-in"}, {}, V::Refused, false, "DoRA on the input axis",
               "PEFT normalises per output row only", "src/peft/tuners/lora/dora.py"},
              {"loha", {"dora"}, {}, V::Refused, false, "DoRA on LoHa", "PEFT has DoRA for LoRA only",
               "src/peft/tuners/loha/layer.py"},
              {"lokr", {"dora"}, {}, V::Refused, false, "DoRA on LoKr", "PEFT has DoRA for LoRA only",
               "src/peft/tuners/lokr/layer.py"},
              {"lora", {"dora-out"}, {}, V::Differs, true, "DoRA strength",
               "the strength scales ΔW inside the norm: m·(W + s·ΔW)/‖W + s·ΔW‖ instead of (W + ΔW)·(s·(g − 1) + 1)",
               "src/peft/tuners/lora/dora.py DoraLinearLayer", kSurvey},
              {"lokr", {"lokr-whole-factors-alpha"}, {}, V::Differs, false, "LoKr whole factors",
               "lora_alpha / r applies even when both factors are whole (we: scale 1)",
               "src/peft/tuners/lokr/layer.py get_delta_weight", kSurvey},
              {"*", {"sparse-bias"}, {}, V::Differs, false, "sparse bias",
               "no PEFT equivalent: `convert --to peft` drops the residual", "src/tools/convert.cpp (ours)"},
          }};
}

// The reference Python LyCORIS as a loader: create_lycoris_from_weights + merge_to (tools/merge.py), commit
// f49d30d6 (3.3.0); its disagreements with its own training forward are docs/loaders.md#quirks, and the
// golden fixtures (tests/data/golden) record them (ref_merged_*, "reference cannot reload its file").
LoaderTable lycoris_py() {
  const std::string wrapper = "lycoris/wrapper.py create_lycoris_from_weights; lycoris/modules/";
  return {"lycoris-py", "LyCORIS (Python reference)", "3.3.0 (f49d30d6)", "KohakuBlueleaf/LyCORIS",
          {"lora", "loha", "lokr", "full", "norm", "diag-oft", "boft", "glora"},
          {"*", {}, {}, V::Refused, false, "cannot load",
           "the loader has no module for these keys (IA3's loader takes the wrong arguments, Q10): it raises",
           wrapper + "ia3.py make_module_from_state_dict"},
          {
              {"loha", {"alpha-not-rank"}, {}, V::Differs, false, "merge applies alpha/r twice",
               "merge_to (tools/merge.py) multiplies ΔW, which already holds alpha/r, by alpha/r again (Q1)",
               wrapper + "loha.py get_merged_weight"},
              {"lokr", {"alpha-not-rank"}, {}, V::Differs, false, "merge applies alpha/r twice",
               "merge_to (tools/merge.py) multiplies ΔW, which already holds alpha/r, by alpha/r again (Q1)",
               wrapper + "lokr.py get_merged_weight"},
              {"*", {"dora-in"}, {}, V::Refused, false, "DoRA on the input axis",
               "the ≥ 3.2 loader expects dora_scale (out, 1, …): shape error (Q8)", wrapper + "lora.py"},
              {"lokr", {"tucker"}, {}, V::Refused, false, "LoKr Tucker",
               "the loader re-derives the layout and takes the rank from lokr_w2_a: shape error (Q4)",
               wrapper + "lokr.py make_module_from_state_dict"},
              {"lora", {"conv-up-2d"}, {}, V::Refused, false, "2-D conv lora_up (DyLoRA)",
               "its LoRA loader needs a conv lora_up (out, r, 1, …) (Q23)", wrapper + "locon.py"},
              {"*", {"no-alpha"}, {}, V::Refused, false, "no alpha", "the loader indexes alpha: KeyError (Q31)",
               wrapper + "(every make_module_from_state_dict)", kSurvey},
              {"full", {"diff-b"}, {}, V::Refused, false, "Full with diff_b",
               "merge_to raises on a Full module with a bias (Q24)", wrapper + "full.py"},
              {"*", {"sparse-bias"}, {}, V::Differs, false, "sparse bias",
               "bias_indices/bias_values are ignored by its loader and merge", wrapper + "locon.py"},
          }};
}

bool has(const Traits& traits, const std::string& t) {
  return std::find(traits.begin(), traits.end(), t) != traits.end();
}

bool matches(const LoaderRule& r, const std::string& algo, const Traits& traits) {
  if (r.algo != "*" && r.algo != algo) return false;
  for (const auto& t : r.when)
    if (!has(traits, t)) return false;
  for (const auto& t : r.unless)
    if (has(traits, t)) return false;
  return true;
}

}  // namespace

const char* to_string(Verdict v) {
  switch (v) {
    case Verdict::Exact: return "exact";
    case Verdict::Differs: return "differs";
    case Verdict::Ignored: return "ignored";
    case Verdict::Refused: return "refused";
  }
  return "?";
}

const std::vector<LoaderTable>& loader_tables() {
  static const std::vector<LoaderTable> all = {comfyui(), sdwebui(), sdcpp(), kohya(), peft(), lycoris_py()};
  return all;
}

const LoaderTable& find_loader(const std::string& name) {
  std::vector<std::string> names;
  for (const auto& t : loader_tables()) {
    if (t.name == name) return t;
    names.push_back(t.name);
  }
  throw OptionError("unknown loader '" + escape_control(name) + "' (known: " + join(names, ", ") + ")");
}

std::vector<const LoaderRule*> matching_rules(const LoaderTable& table, const std::string& algo,
                                              const Traits& traits) {
  if (std::find(table.reads.begin(), table.reads.end(), algo) == table.reads.end()) return {&table.otherwise};
  std::vector<const LoaderRule*> out;
  for (const auto& r : table.rules)
    if (matches(r, algo, traits)) out.push_back(&r);
  return out;
}

Verdict combined_verdict(const std::vector<const LoaderRule*>& rules) {
  Verdict v = Verdict::Exact;
  for (const auto* r : rules) v = std::max(v, r->verdict);
  return v;
}

}  // namespace lycoris::tools
