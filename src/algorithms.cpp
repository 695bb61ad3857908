// The algorithm registry: the only place that lists every algorithm. Each entry is defined next to
// its adapter module (src/modules/<algo>.cpp). Order = the reference's detection order (docs/format.md#detection).
#include "lycoris/algorithms.hpp"

#include <algorithm>
#include <cctype>

#include "lycoris/error.hpp"
#include "lycoris/text.hpp"

namespace lycoris {

Algorithm lora_algorithm();      // modules/lora.cpp   (LoRA/LoCon, also reads DyLoRA files)
Algorithm loha_algorithm();      // modules/loha.cpp
Algorithm ia3_algorithm();       // modules/ia3.cpp
Algorithm lokr_algorithm();      // modules/lokr.cpp
Algorithm full_algorithm();      // modules/full.cpp
Algorithm norm_algorithm();      // modules/norm.cpp
Algorithm diag_oft_algorithm();  // modules/diag_oft.cpp
Algorithm boft_algorithm();      // modules/boft.cpp
Algorithm glora_algorithm();     // modules/glora.cpp
Algorithm dylora_algorithm();    // modules/dylora.cpp (never detected: its files are LoRA files)
Algorithm glokr_algorithm();     // modules/glokr.cpp  (ours: docs/glokr.md)

const std::vector<std::pair<std::string, std::string>>& known_traits() {
  static const std::vector<std::pair<std::string, std::string>> all = {
      {"linear", "the layer is a Linear (2-D weight)"},
      {"conv1d", "the layer is a Conv1d (3-D weight)"},
      {"conv2d", "the layer is a Conv2d (4-D weight)"},
      {"conv3d", "the layer is a Conv3d (5-D weight)"},
      {"tucker", "a Tucker core: lora_mid, hada_t1/hada_t2 or lokr_t2"},
      {"dora", "a dora_scale (DoRA), either axis"},
      {"dora-out", "dora_scale (out, 1, …): DoRA per output row"},
      {"dora-in", "dora_scale (1, in, …): DoRA per input column (LyCORIS < 3.2)"},
      {"no-alpha", "a rank-r module without alpha (scale 1)"},
      {"alpha-not-rank", "a rank-r module with alpha ≠ r (scale ≠ 1)"},
      {"sparse-bias", "bias_indices/bias_values: a sparse residual added to ΔW (docs/format.md#sparse-bias)"},
      {"conv-up-2d", "a conv LoRA with a 2-D lora_up (O, r) (DyLoRA's conv files)"},
      {"lokr-w2-whole-kernel", "LoKr with a whole lokr_w2 that carries the kernel (3-D or more)"},
      {"lokr-whole-factors-alpha", "LoKr with both factors whole (scale 1) and a stored alpha ≠ 1"},
      {"lokr-rank1-alpha", "LoKr of rank 1 with alpha ≠ 1"},
      {"lokr-ranks-differ", "LoKr with lokr_w1_b and lokr_w2_b of different ranks (the scale reads lokr_w1_b's)"},
      {"diff-b", "Full with a bias difference diff_b"},
      {"rescale", "Diag-OFT/BOFT with a rescale vector"},
      {"constraint-zero", "Diag-OFT/BOFT without a constraint (alpha 0 or absent)"},
      {"constraint-below-q", "Diag-OFT/BOFT whose constraint alpha is below ‖Q‖ (a clip at alpha, not alpha·O, binds)"},
      {"no-b-norm", "Norm without b_norm"},
  };
  return all;
}

std::string layer_kind_trait(int64_t dims) {
  static const char* const kinds[] = {"linear", "conv1d", "conv2d", "conv3d"};
  return dims >= 2 && dims <= 5 ? kinds[dims - 2] : "";
}

const std::vector<Algorithm>& algorithms() {
  static const std::vector<Algorithm> all = {
      lora_algorithm(), loha_algorithm(),     ia3_algorithm(),  lokr_algorithm(),  full_algorithm(),
      norm_algorithm(), diag_oft_algorithm(), boft_algorithm(), glora_algorithm(), dylora_algorithm(),
      glokr_algorithm(),
  };
  return all;
}

const Algorithm& find_algorithm(const std::string& name) {
  std::string key = name;  // names are case-insensitive: "LoKr" is "lokr"
  std::transform(key.begin(), key.end(), key.begin(), [](unsigned char c) { return std::tolower(c); });
  std::string known;
  for (const auto& a : algorithms()) {
    if (a.name == key) return a;
    for (const auto& alias : a.aliases)
      if (alias == key) return a;
    known += (known.empty() ? "" : ", ") + a.name;
    if (!a.aliases.empty()) known += " (also " + join(a.aliases, ", ") + ")";
  }
  throw OptionError("unknown algorithm '" + escape_control(name) + "' (known: " + known + ")");
}

const Algorithm* detect_algorithm(const TensorMap& module_tensors) {
  for (const auto& a : algorithms())
    if (a.detect && a.detect(module_tensors)) return &a;
  return nullptr;
}

AdapterPtr load_adapter(const std::string& module, const TensorMap& module_tensors, const LayerSpec& layer) {
  const Algorithm* a = detect_algorithm(module_tensors);
  if (!a) {
    std::string keys;
    for (const auto& kv : module_tensors) keys += (keys.empty() ? "" : ", ") + kv.first;
    throw KeyError(module + ": no known algorithm for keys {" + keys + "}");
  }
  return a->load(module, module_tensors, layer);
}

}  // namespace lycoris
