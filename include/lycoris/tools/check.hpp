// `lycoris check ADAPTER --base BASE`: why would a loader say "lora key not loaded"? (docs/tools.md#check)
//
// Per module: the base key it maps to and through which naming rule (naming::Resolver dialects), or that
// it matches nothing (with the closest base names); whether its tensors fit the base layer's shape
// (the registry's loader validates every stored shape); NaN/Inf in its tensors. For the adapter as a
// whole: base layers of the families it covers elsewhere that it does not touch (family = the layer's
// dotted path with numbers wildcarded, last two named components: "attn1.to_q", "resnets.*.conv1"), and
// the places where other loaders read such modules differently (docs/loaders.md, docs/loaders.md#quirks).
// Adapters in LyCORIS, kohya and PEFT/diffusers naming are accepted (tools::read_adapter).
#pragma once
#include <string>
#include <vector>

#include "lycoris/naming.hpp"

namespace lycoris::tools {

struct CheckModule {
  std::string name;       // module name as in the file
  std::string algo;       // detected algorithm ("" = none)
  std::string status;     // "ok", "unmatched", "ambiguous", "shape", "malformed", "nonfinite"
  std::string base_key;   // weight key it maps to ("" if unmatched)
  std::string rule;       // naming dialect ("standalone", "ldm", "sgm", "ldm-openclip", …)
  std::string prefix;     // prefix the rule used
  int part = 0, parts = 0;  // row block of a fused base tensor (parts > 0)
  std::vector<int64_t> layer_shape;  // the base layer's weight shape (one block of a fused tensor); empty if none
  std::vector<std::string> problems;  // one line each
  std::vector<std::string> closest;   // for unmatched modules: the nearest names the base knows
};

struct CheckNote {
  std::string topic;                 // e.g. "DoRA axis"
  std::string text;                  // how other loaders differ
  std::vector<std::string> modules;  // modules it concerns
};

struct CheckReport {
  std::string adapter, base;
  std::string adapter_format;  // lycoris | kohya | peft
  std::string base_layout;     // diffusers | ldm (detected or forced)
  std::vector<CheckModule> modules;
  std::vector<std::string> file_problems;  // about the file as a whole: no module, tensors outside modules
  std::vector<std::string> uncovered;   // base weight keys of covered families the adapter does not touch
  std::vector<std::string> families;    // the covered families
  std::vector<CheckNote> notes;         // loader disagreements (informational)
  std::vector<std::string> input_notes; // how the file was read (PEFT alphas, …)

  // Modules with a problem (unmatched, ambiguous, shape, malformed, NaN/Inf, overflow) plus file problems.
  // 0 = clean.
  size_t problems() const;
  std::string json() const;
  std::string text() const;
};

// Throws lycoris::Error for bad input (unreadable files, a layout that contradicts the base's keys).
CheckReport check(const std::string& adapter, const std::string& base,
                  naming::BaseFormat format = naming::BaseFormat::Auto);

}  // namespace lycoris::tools
