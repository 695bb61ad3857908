// `lycoris convert ADAPTER --for comfyui|sdwebui|sdcpp --base BASE -o OUT [--strength S]`: rewrite every module
// the loader would not apply exactly (its rule table, tools/loader_rules.hpp) into a form it applies exactly,
// keeping our ΔW (docs/tools.md#convert-for):
//   * the exact low-rank LoRA of ΔW (SVD, truncated at the numerical rank) when that is smaller than the
//     layer: a Tucker LoRA becomes a plain LoRA of the same rank, a misread LoKr a LoRA of rank ≤ its own;
//   * else a Full `diff` (with `diff_b` where the module changes the bias).
// A module whose loader only differs at strength ≠ 1 (Diag-OFT / BOFT, DoRA) is rewritten from its ΔW at
// `strength` divided by `strength`: loaded at that strength it gives our weight exactly, at others the
// loader's linear ΔW (said in the report). Modules already exact are copied unchanged, names included.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lycoris/naming.hpp"
#include "lycoris/tools/loader_rules.hpp"

namespace lycoris::tools {

struct ConvertForOptions {
  std::string loader;  // comfyui | sdwebui | sdcpp (the tables convert can write for)
  std::string base;    // the base checkpoint: needed for ΔW of modules that depend on W (DoRA, (IA)^3, OFT)
  double strength = 1.0;  // where strength-dependent modules are baked (≠ 0)
};

struct ConvertForModule {
  std::string name, algo;
  Verdict before = Verdict::Exact;  // the loader's verdict on the input module
  std::string form;                 // "kept", "lora", "diff"
  int64_t rank = 0;                 // of the "lora" form
  int64_t bytes_before = 0, bytes_after = 0;
  bool baked = false;  // rewritten at `strength` (exact only at that strength)
  std::string note;
};

struct ConvertForReport {
  const LoaderTable* loader = nullptr;
  std::vector<ConvertForModule> modules;
  std::vector<std::string> warnings;
  size_t rewritten() const;
  std::string json() const;
  std::string text() const;
};

// OptionError for a loader convert cannot write for or strength 0; KeyError/ShapeError/FormatError for the
// files (a module that needs --base when none is given names itself). The output is written atomically.
ConvertForReport convert_for(const std::string& input, const std::string& output, const ConvertForOptions& options);

}  // namespace lycoris::tools
