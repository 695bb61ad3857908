// How other programs read our files: one rule table per loader (src/tools/loader_rules.cpp), each naming the
// loader's version and the code it describes, matched on the registry's module traits (algorithms.hpp,
// known_traits()). `check --loader` and `convert --for` read them; plain `check` lists their disagreements.
// The matrix they produce and the reasoning: docs/loaders.md#matrix.
#pragma once
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"

namespace lycoris::tools {

// What a loader does with one module, mildest first.
enum class Verdict {
  Exact,    // applied exactly: our ΔW at every strength
  Differs,  // applied, but to a different ΔW (at every strength or only at strength ≠ 1)
  Ignored,  // skipped with at most a "key not loaded" line: the model is left unchanged there
  Refused,  // an error: the module (or the whole file) is not applied
};
const char* to_string(Verdict v);  // "exact", "differs", "ignored", "refused"

// One rule: modules of `algo` ("*" = any) having every trait of `when` and none of `unless`.
struct LoaderRule {
  std::string algo;
  std::vector<std::string> when, unless;
  Verdict verdict = Verdict::Differs;
  bool only_off_unit_strength = false;  // Differs only at strength ≠ 1 (they agree at 1)
  std::string topic;                    // short: "DoRA norm", "Tucker on Conv1d"
  std::string how;                      // what the loader does instead
  std::string code;                     // the file (and function) in the loader's repository
  bool verified = true;                 // read in that code (or run); false: from the survey in docs/loaders.md
};

struct LoaderTable {
  std::string name;     // "comfyui", "sdwebui", "sdcpp", "kohya", "peft", "lycoris-py"
  std::string title;    // "ComfyUI"
  std::string version;  // the version or date the rules describe
  std::string repo;     // owner/name on GitHub
  std::vector<std::string> reads;  // algorithms it implements; the others get `otherwise`
  LoaderRule otherwise;            // the rule for an algorithm it does not implement
  std::vector<LoaderRule> rules;
};

// Every table, in a fixed order; by name (OptionError listing the names when unknown).
const std::vector<LoaderTable>& loader_tables();
const LoaderTable& find_loader(const std::string& name);

// The rules of `table` that match a module of `algo` with `traits` (empty: applied exactly), and their
// combined verdict (the most severe).
std::vector<const LoaderRule*> matching_rules(const LoaderTable& table, const std::string& algo, const Traits& traits);
Verdict combined_verdict(const std::vector<const LoaderRule*>& rules);

}  // namespace lycoris::tools
