// `lycoris check --loader` (see include/lycoris/tools/check_loader.hpp).
#include "lycoris/tools/check_loader.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/text.hpp"
#include "lycoris/tools/check.hpp"
#include "lycoris/tools/convert.hpp"

namespace lycoris::tools {

namespace {

const char* strengths(const LoaderRule& r) {
  if (r.verdict != Verdict::Differs) return "";
  return r.only_off_unit_strength ? "at strength ≠ 1; equal at 1" : "at every strength";
}

// The words of `check --loader`'s report for each verdict.
const char* verdict_words(Verdict v) {
  switch (v) {
    case Verdict::Exact: return "applied exactly";
    case Verdict::Differs: return "applied differently";
    case Verdict::Ignored: return "ignored silently";
    case Verdict::Refused: return "refused";
  }
  return "?";
}

// A module no algorithm recognises: no loader can read it either.
const LoaderRule& unknown_keys_rule() {
  static const LoaderRule r{"*", {}, {}, Verdict::Refused, false, "unknown keys",
                            "no algorithm recognises the module's keys (`lycoris check` names them)", "", true};
  return r;
}

bool is_kind(const std::string& trait) {
  for (int64_t d = 2; d <= 5; ++d)
    if (trait == layer_kind_trait(d)) return true;
  return false;
}

}  // namespace

std::string loader_rule_text(const LoaderRule& r) {
  std::string s = std::string(to_string(r.verdict)) + ": " + r.how;
  if (r.verdict == Verdict::Differs) s += std::string(" (") + strengths(r) + ")";
  if (!r.code.empty()) s += " [" + r.code + "]";
  if (!r.verified) s += " (unverified: from docs/loaders.md's survey, not re-read in the current code)";
  return s;
}

Traits module_traits(const Algorithm& algo, const std::string& module, const TensorMap& tensors,
                     int64_t base_weight_dims) {
  Traits traits = algo.traits ? algo.traits(module, tensors) : Traits{};
  if (const auto kind = layer_kind_trait(base_weight_dims); !kind.empty()) {
    traits.erase(std::remove_if(traits.begin(), traits.end(), is_kind), traits.end());
    traits.push_back(kind);
  }
  return traits;
}

bool LoaderCheckReport::exact() const { return count(Verdict::Exact) == modules.size(); }

size_t LoaderCheckReport::count(Verdict v) const {
  return static_cast<size_t>(
      std::count_if(modules.begin(), modules.end(), [v](const LoaderModuleVerdict& m) { return m.verdict == v; }));
}

LoaderCheckReport check_loader(const std::string& adapter, const std::string& loader, const std::string& base,
                               naming::BaseFormat format) {
  LoaderCheckReport report;
  report.adapter = adapter;
  report.base = base;
  report.loader = &find_loader(loader);
  const auto contents = read_adapter(adapter);
  if (contents.modules.empty()) throw KeyError(adapter + ": " + no_modules_problem(contents.tensors));
  report.notes = contents.notes;
  std::map<std::string, int64_t> dims;  // module → its base layer's weight dims
  if (!base.empty()) {
    const auto checked = check(adapter, base, format);
    size_t unmatched = 0;
    for (const auto& m : checked.modules) {
      if (m.layer_shape.empty()) ++unmatched;
      else dims[m.name] = static_cast<int64_t>(m.layer_shape.size());
    }
    if (unmatched)
      report.notes.push_back(std::to_string(unmatched) + " module(s) match no layer of the base (`lycoris check` "
                             "says why): their layer kind comes from the stored shapes");
  } else {
    report.notes.push_back("no --base: layer kinds come from the stored shapes");
  }
  torch::NoGradGuard no_grad;
  for (const auto& m : contents.modules) {
    LoaderModuleVerdict v;
    v.name = m.name;
    const Algorithm* algo = detect_algorithm(m.tensors);
    if (!algo) {
      v.rules = {&unknown_keys_rule()};
    } else {
      v.algo = algo->name;
      try {
        v.traits = module_traits(*algo, m.name, m.tensors, dims.count(m.name) ? dims.at(m.name) : 0);
      } catch (const Error& e) {  // an unreadable value: only the algorithm's own rules apply
        report.notes.push_back(escape_control(e.what()));
      }
      v.rules = matching_rules(*report.loader, algo->name, v.traits);
    }
    v.verdict = combined_verdict(v.rules);
    report.modules.push_back(std::move(v));
  }
  return report;
}

std::string LoaderCheckReport::json() const {
  nlohmann::ordered_json j;
  j["adapter"] = adapter;
  j["base"] = base;
  j["loader"] = {{"name", loader->name}, {"title", loader->title}, {"version", loader->version},
                 {"repo", loader->repo}};
  j["exact"] = exact();
  j["counts"] = nlohmann::ordered_json::object();
  for (auto v : {Verdict::Exact, Verdict::Differs, Verdict::Ignored, Verdict::Refused})
    j["counts"][to_string(v)] = count(v);
  j["modules"] = nlohmann::json::array();
  for (const auto& m : modules) {
    nlohmann::ordered_json o;
    o["name"] = m.name;
    o["algo"] = m.algo;
    o["traits"] = m.traits;
    o["verdict"] = to_string(m.verdict);
    o["rules"] = nlohmann::json::array();
    for (const auto* r : m.rules)
      o["rules"].push_back(nlohmann::ordered_json{{"topic", r->topic},
                                                  {"verdict", to_string(r->verdict)},
                                                  {"strengths", r->verdict == Verdict::Differs
                                                                    ? (r->only_off_unit_strength ? "not 1" : "all")
                                                                    : ""},
                                                  {"how", r->how},
                                                  {"code", r->code},
                                                  {"verified", r->verified}});
    j["modules"].push_back(o);
  }
  j["notes"] = notes;
  return j.dump(2);
}

std::string LoaderCheckReport::text() const {
  const auto safe = [](const std::string& t) { return escape_control(t); };
  std::ostringstream os;
  os << "adapter " << safe(adapter) << " (" << modules.size() << " modules)\n";
  os << "loader  " << loader->title << " (" << loader->version << "; github.com/" << loader->repo << ")\n";
  for (const auto& n : notes) os << "note: " << safe(n) << "\n";
  for (const auto& m : modules) {
    std::string label = verdict_words(m.verdict);
    for (auto& ch : label) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    os << label << "  " << safe(m.name) << (m.algo.empty() ? "" : "  " + m.algo) << "\n";
    for (const auto* r : m.rules) {
      os << "    " << r->topic << ": " << r->how;
      if (r->verdict == Verdict::Differs) os << " (" << strengths(*r) << ")";
      if (r->verdict != m.verdict) os << " [" << verdict_words(r->verdict) << "]";
      os << "\n      " << r->code << (r->verified ? "" : " (unverified: from docs/loaders.md's survey)") << "\n";
    }
  }
  os << modules.size() << " module(s): " << count(Verdict::Exact) << " applied exactly, " << count(Verdict::Differs)
     << " applied differently, " << count(Verdict::Refused) << " refused, " << count(Verdict::Ignored)
     << " ignored silently\n";
  const bool convertible = loader->name == "comfyui" || loader->name == "sdwebui" || loader->name == "sdcpp";
  if (exact()) os << "the loader reproduces every module's ΔW at every strength\n";
  else os << "the loader does not reproduce this file exactly"
          << (convertible ? " (`lycoris convert --for " + loader->name + "` rewrites it)" : std::string()) << "\n";
  return os.str();
}

}  // namespace lycoris::tools
