// `lycoris check` (see include/lycoris/tools/check.hpp).
#include "lycoris/tools/check.hpp"

#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/host_layer.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/jit.hpp"
#include "lycoris/layer.hpp"
#include "lycoris/text.hpp"
#include "lycoris/tools/check_loader.hpp"
#include "lycoris/tools/convert.hpp"
#include "lycoris/adapter_file.hpp"
#include "module_fit.hpp"

namespace lycoris::tools {

namespace F = functional;

namespace {

// The dotted path with numbers wildcarded, from the end until two named components are included:
// "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0" → "attn1.to_out.*".
std::string family(const std::string& path) {
  std::vector<std::string> parts;
  std::stringstream ss(path);
  for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
  std::vector<std::string> kept;
  int named = 0;
  for (auto it = parts.rbegin(); it != parts.rend() && named < 2; ++it) {
    const bool number = !it->empty() && std::all_of(it->begin(), it->end(), ::isdigit);
    kept.push_back(number ? "*" : *it);
    named += number ? 0 : 1;
  }
  std::string out;
  for (auto it = kept.rbegin(); it != kept.rend(); ++it) out += (out.empty() ? "" : ".") + *it;
  return out;
}

// The base as check() reads it: its weight names, dtypes and shapes, and the tensors themselves; a
// safetensors checkpoint, or the parameters of a TorchScript archive by their state-dict names. For an
// archive, `skipped` holds the weights of the layers its host view will not adapt, with the reason
// (docs/training.md#torchscript): a file module there fits the tensor but would make loading fail.
struct Base {
  std::vector<std::string> keys;
  std::map<std::string, std::pair<io::DType, std::vector<int64_t>>> info;
  std::function<torch::Tensor(const std::string&)> tensor;
  std::map<std::string, std::string> skipped;

  static Base open(const std::string& path) {
    Base b;
    if (torchscript::is_archive(path)) {
      const auto model = torchscript::load(path);
      std::map<std::string, torch::Tensor> params;
      for (const auto& p : model.named_parameters()) {
        b.keys.push_back(p.name);
        b.info[p.name] = {io::from_torch(p.value.scalar_type()), p.value.sizes().vec()};
        params[p.name] = p.value.detach();
      }
      for (const auto& [module_path, module] : preorder(host_module(model))) {
        std::string why;
        if (!module->layer(&why) && !why.empty()) b.skipped[module_path + ".weight"] = why;
      }
      b.tensor = [params](const std::string& key) { return params.at(key); };
      return b;
    }
    auto file = std::make_shared<io::SafetensorsFile>(io::SafetensorsFile::open(path));
    b.keys = file->names();
    for (const auto& t : file->tensors()) b.info[t.name] = {t.dtype, t.shape};
    b.tensor = [file](const std::string& key) { return file->tensor(key); };
    return b;
  }
};

// The module merged at weight 1 into its base layer must stay finite in the base's dtype, as a merge
// writes it: "" when it does, else the problem ("overflow: …").
std::string merge_overflow(const Base& base, const naming::BaseLayer& layer, AdapterImpl& adapter) {
  const io::DType stored = base.info.at(layer.weight_key).first;
  if (!io::is_floating(stored) || !io::has_torch_dtype(stored)) return "";
  auto W = base.tensor(layer.weight_key);
  if (layer.fused()) {
    const int64_t rows = W.size(0) / layer.parts;
    W = W.narrow(0, layer.part * rows, rows);
  }
  const auto dtype = io::to_torch(stored);
  const auto merged = adapter.apply_weight(W.to(dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32), 1.0);
  if (F::finite_in(merged, dtype)) return "";
  char buf[160];
  std::snprintf(buf, sizeof buf, "overflow: merged at weight 1, %s reaches |x| = %.4g, beyond the range of %s: a merge "
                "would write Inf (merge with a wider --dtype or a smaller weight)",
                layer.weight_key.c_str(), merged.abs().max().item<double>(), io::dtype_name(stored));
  return buf;
}

// "<weight key>#<part>": a layer, or one block of a fused tensor.
std::string layer_id(const naming::BaseLayer& l) { return l.weight_key + "#" + std::to_string(l.part); }

// NaN/Inf in a module's tensors. An alpha no loader reads (no low-rank factor: LoKr with both factors full,
// scale 1) may be Inf, as an fp16 save of a full-dimension LoKr's alpha = rank once made it.
std::vector<std::string> nonfinite_problems(const TensorMap& tensors) {
  const Algorithm* algo = detect_algorithm(tensors);
  const bool alpha_unused = algo && algo->rank && algo->rank(tensors) == 0;
  std::vector<std::string> out;
  for (const auto& [suffix, t] : tensors)
    if (t.is_floating_point() && !(suffix == "alpha" && alpha_unused)) {
      const auto bad = (~torch::isfinite(t)).sum().item<int64_t>();
      if (bad > 0) out.push_back("nonfinite: " + suffix + " has " + std::to_string(bad) + " NaN/Inf value(s)");
    }
  return out;
}

// Layers the same naming rules reach, of a family the adapter covers elsewhere, but not covered (sorted).
std::vector<std::string> uncovered_layers(const naming::Resolver& names,
                                          const std::set<std::pair<std::string, std::string>>& rules_used,
                                          const std::set<std::string>& families, const std::set<std::string>& covered) {
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (const auto* r : names.all()) {
    if (!rules_used.count({r->dialect, r->prefix}) || !families.count(family(r->path))) continue;
    const auto id = layer_id(r->layer);
    if (covered.count(id) || !seen.insert(id).second) continue;
    out.push_back(r->layer.weight_key + (r->layer.fused() ? " (part " + std::to_string(r->layer.part) + ")" : "") +
                  " [" + r->module + "]");
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

size_t CheckReport::problems() const {
  size_t n = file_problems.size();
  for (const auto& m : modules) n += m.problems.empty() ? 0 : 1;
  return n;
}

CheckReport check(const std::string& adapter_path, const std::string& base_path, naming::BaseFormat format) {
  CheckReport report;
  report.adapter = adapter_path;
  report.base = base_path;
  const auto base = Base::open(base_path);
  auto adapter = read_adapter(adapter_path);
  report.adapter_format = to_string(adapter.format);
  report.input_notes = adapter.notes;
  if (adapter.modules.empty()) report.file_problems.push_back(no_modules_problem(adapter.tensors));
  if (!adapter.stray_keys.empty()) report.file_problems.push_back(stray_keys_problem(adapter.stray_keys));
  const auto& keys = base.keys;
  const naming::Resolver names(keys, format);
  report.base_layout = naming::to_string(format == naming::BaseFormat::Auto ? naming::detect_base_format(keys) : format);
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& [key, info] : base.info) shapes[key] = info.second;

  std::set<std::pair<std::string, std::string>> rules_used;  // (dialect, prefix)
  std::set<std::string> covered, families;                     // "<weight key>#<part>"
  std::map<std::string, CheckNote> notes;

  torch::NoGradGuard no_grad;
  for (const auto& m : adapter.modules) {
    CheckModule c;
    c.name = m.name;
    // PEFT modules are looked up under their kohya name (same path, underscored)
    const std::string lookup = adapter.format == AdapterFormat::Peft
                                   ? naming::module_name(component_prefix(m.component, AdapterFormat::Kohya), m.path)
                                   : m.name;
    c.problems = nonfinite_problems(m.tensors);
    const auto fit = detail::fit_module(names, lookup, m.name, m.tensors, [&](const naming::Resolution& h) {
      const auto shape = naming::layer_shape(h.layer, shapes.at(h.layer.weight_key));
      return LayerSpec::from_weight_shape(shape, !h.layer.bias_key.empty());
    });
    using Outcome = detail::ModuleFit::Outcome;
    const Algorithm* algo = fit.algo;
    if (!algo)
      c.problems.insert(c.problems.begin(), "malformed: " + detail::no_algorithm_problem(m.tensors));
    else
      c.algo = algo->name;
    if (fit.outcome == Outcome::Unmatched) {
      c.closest = names.closest(lookup, 3);
      c.problems.insert(c.problems.begin(), "unmatched: matches no base layer (closest: " + join(c.closest, ", ") + ")");
    } else if (algo) {
      const naming::Resolution* target = fit.fits.size() == 1 ? fit.fits[0].first
                                         : fit.fits.empty()   ? fit.candidates[0]
                                                              : nullptr;
      if (fit.outcome == Outcome::Malformed) c.problems.insert(c.problems.begin(), "malformed: " + fit.malformed_error);
      else if (fit.outcome == Outcome::Misfit)
        c.problems.insert(c.problems.begin(), "shape: " + fit.misfit_error + " (base " + fit.misfit->layer.weight_key + ")");
      else if (fit.outcome == Outcome::Ambiguous) {
        std::vector<std::string> k;
        for (const auto& f : fit.fits) k.push_back(f.first->layer.weight_key);
        c.problems.insert(c.problems.begin(), "ambiguous: the name denotes several base layers (" + join(k, ", ") + ")");
      }
      if (const auto skip = target ? base.skipped.find(target->layer.weight_key) : base.skipped.end();
          skip != base.skipped.end())
        c.problems.insert(c.problems.begin(), "unadaptable: the model's layer " + target->layer.weight_key +
                                                  " cannot take an adapter: " + skip->second);
      if (fit.outcome == Outcome::Fits && c.problems.empty()) {
        auto& fitted = *fit.fits[0].second;
        fitted.eval();
        if (auto overflow = merge_overflow(base, target->layer, fitted); !overflow.empty()) c.problems.push_back(overflow);
      }
      if (target) {
        c.base_key = target->layer.weight_key;
        c.rule = target->dialect;
        c.prefix = target->prefix;
        c.part = target->layer.part;
        c.parts = target->layer.parts;
        c.layer_shape = naming::layer_shape(target->layer, shapes.at(target->layer.weight_key));
        rules_used.emplace(target->dialect, target->prefix);
        covered.insert(layer_id(target->layer));
        families.insert(family(target->path));
      }
      try {
        const auto traits = module_traits(*algo, m.name, m.tensors, static_cast<int64_t>(c.layer_shape.size()));
        for (const auto& table : loader_tables())
          for (const auto* rule : matching_rules(table, algo->name, traits)) {
            auto& n = notes[table.title + ": " + rule->topic];
            n.topic = table.title + ": " + rule->topic;
            n.text = loader_rule_text(*rule);
            n.modules.push_back(m.name);
          }
      } catch (const Error&) {  // unreadable alpha etc.: already reported as malformed by the loader
      }
    }
    c.status = c.problems.empty() ? "ok" : c.problems.front().substr(0, c.problems.front().find(':'));
    report.modules.push_back(std::move(c));
  }

  report.uncovered = uncovered_layers(names, rules_used, families, covered);
  report.families.assign(families.begin(), families.end());
  for (auto& [k, n] : notes) report.notes.push_back(std::move(n));
  return report;
}

std::string CheckReport::json() const {
  nlohmann::ordered_json j;
  j["adapter"] = adapter;
  j["base"] = base;
  j["adapter_format"] = adapter_format;
  j["base_layout"] = base_layout;
  j["problems"] = problems();
  j["file_problems"] = file_problems;
  j["modules"] = nlohmann::json::array();
  for (const auto& m : modules) {
    nlohmann::ordered_json o;
    o["name"] = m.name;
    o["algo"] = m.algo;
    o["status"] = m.status;
    o["base_key"] = m.base_key;
    o["rule"] = m.rule;
    o["prefix"] = m.prefix;
    if (m.parts) o["fused_part"] = {m.part, m.parts};
    o["problems"] = m.problems;
    if (!m.closest.empty()) o["closest"] = m.closest;
    j["modules"].push_back(o);
  }
  j["covered_families"] = families;
  j["uncovered"] = uncovered;
  j["loader_notes"] = nlohmann::json::array();
  for (const auto& n : notes) j["loader_notes"].push_back({{"topic", n.topic}, {"text", n.text}, {"modules", n.modules}});
  j["input_notes"] = input_notes;
  return j.dump(2);
}

std::string CheckReport::text() const {
  // names and keys come from the files: escaped, so that none can forge a line of this report
  const auto safe = [](const std::string& t) { return escape_control(t); };
  std::ostringstream os;
  os << "adapter " << safe(adapter) << " (" << adapter_format << " naming, " << modules.size() << " modules)\n";
  os << "base    " << safe(base) << " (" << base_layout << " layout)\n";
  for (const auto& n : input_notes) os << "note: " << safe(n) << "\n";
  for (const auto& p : file_problems) os << "PROBLEM  the file " << safe(p) << "\n";
  for (const auto& m : modules) {
    std::string status = m.status;
    for (auto& ch : status) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    os << status << "  " << safe(m.name);
    if (!m.base_key.empty()) {
      os << " -> " << safe(m.base_key);
      if (m.parts) os << " rows part " << m.part << "/" << m.parts;
      os << "  [" << m.rule << ", " << safe(m.prefix) << "]";
    }
    if (!m.algo.empty()) os << "  " << m.algo;
    os << "\n";
    for (const auto& p : m.problems) os << "    " << safe(p) << "\n";
  }
  if (!uncovered.empty())
  {
    std::vector<std::string> shown;
    for (const auto& u : uncovered) shown.push_back(safe(u));
    os << uncovered.size() << " base layer(s) of families the adapter covers elsewhere ("
       << safe(join(families, ", ", 12)) << ") are not touched:\n    " << join(shown, "\n    ", 30) << "\n";
  }
  if (!notes.empty()) {
    os << "other loaders read this file differently (`check --loader NAME` for one of them):\n";
    for (const auto& n : notes)
      os << "  - " << n.topic << " (" << n.modules.size() << " module(s), e.g. " << safe(n.modules.front())
         << "): " << n.text << "\n";
  }
  const size_t p = problems();
  if (p && file_problems.empty()) os << p << " module(s) with problems\n";
  else if (p) os << p << " problem(s): " << file_problems.size() << " with the file, " << p - file_problems.size()
                 << " module(s)\n";
  else os << "clean: every module maps to a base layer and fits it\n";
  return os.str();
}

}  // namespace lycoris::tools
