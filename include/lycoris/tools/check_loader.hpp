// `lycoris check ADAPTER [--base BASE] --loader NAME`: what one other program does with each module of a file,
// by that loader's rule table (tools/loader_rules.hpp, docs/loaders.md#matrix): applied exactly, applied
// differently (how, at which strengths), refused, or ignored. Without a base, the layer kind comes from the
// stored shapes (enough for every rule that depends on it: those concern modules that store the kernel).
#pragma once
#include <string>
#include <vector>

#include "lycoris/naming.hpp"
#include "lycoris/tools/loader_rules.hpp"

namespace lycoris::tools {

struct LoaderModuleVerdict {
  std::string name;  // as in the file
  std::string algo;  // "" = no algorithm recognised (the loader cannot read it either: refused)
  Traits traits;
  Verdict verdict = Verdict::Exact;
  std::vector<const LoaderRule*> rules;  // the rules that decided it (none: exact)
};

struct LoaderCheckReport {
  std::string adapter, base;  // base "" = none
  const LoaderTable* loader = nullptr;
  std::vector<LoaderModuleVerdict> modules;
  std::vector<std::string> notes;  // how the file was read (PEFT alphas, layer kinds from shapes)

  // Whether the loader reproduces our ΔW of every module at every strength (exit code 0).
  bool exact() const;
  size_t count(Verdict v) const;
  std::string json() const;
  std::string text() const;
};

// Throws lycoris::Error for unreadable files, OptionError for an unknown loader name.
LoaderCheckReport check_loader(const std::string& adapter, const std::string& loader, const std::string& base = "",
                               naming::BaseFormat format = naming::BaseFormat::Auto);

// What a rule says, on one line: "<verdict>: <how> (<strengths>) [<code>]", "unverified" where it is.
std::string loader_rule_text(const LoaderRule& rule);

// The traits of one module: the registry's, the layer kind replaced by that of `base_weight_dims` (0 = unknown).
Traits module_traits(const Algorithm& algo, const std::string& module, const TensorMap& tensors,
                     int64_t base_weight_dims = 0);

}  // namespace lycoris::tools
