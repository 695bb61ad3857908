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
#include "lycoris/io/safetensors.hpp"
#include "lycoris/jit.hpp"
#include "lycoris/layer.hpp"
#include "lycoris/text.hpp"
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
// safetensors checkpoint, or the parameters of a TorchScript archive by their state-dict names.
struct Base {
  std::vector<std::string> keys;
  std::map<std::string, std::pair<io::DType, std::vector<int64_t>>> info;
  std::function<torch::Tensor(const std::string&)> tensor;

  static Base open(const std::string& path) {
    Base b;
    if (torchscript::is_archive(path)) {
      std::map<std::string, torch::Tensor> params;
      for (const auto& p : torchscript::load(path).named_parameters()) {
        b.keys.push_back(p.name);
        b.info[p.name] = {io::from_torch(p.value.scalar_type()), p.value.sizes().vec()};
        params[p.name] = p.value.detach();
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

bool has(const TensorMap& t, const char* k) { return t.count(k) > 0; }

// Where other loaders read a module differently (docs/loaders.md#summary, docs/loaders.md#quirks); (topic, text) pairs.
std::vector<std::pair<std::string, std::string>> loader_notes(const std::string& name, const Algorithm& algo,
                                                              const TensorMap& t) {
  std::vector<std::pair<std::string, std::string>> out;
  const std::string& a = algo.name;
  const int64_t rank = algo.rank ? algo.rank(t) : 0;
  double alpha = std::nan("");
  if (has(t, "alpha")) alpha = F::scalar_value(t.at("alpha"), name, "alpha");
  if (auto it = t.find("dora_scale"); it != t.end()) {
    const auto& d = it->second;
    if (d.dim() >= 2 && d.size(0) == 1 && d.size(1) > 1)
      out.emplace_back("DoRA on the input axis",
                       "dora_scale (1, in, …) is the LyCORIS < 3.2 convention (wd_on_output=False): the reference "
                       "LyCORIS ≥ 3.2 loader cannot load it (docs/loaders.md#q8-dora-input-axis); PEFT has no input-axis DoRA; ComfyUI detects the "
                       "axis from the shape; stable-diffusion.cpp ignores dora_scale");
    else
      out.emplace_back("DoRA on the output axis",
                       "dora_scale (out, 1, …): sd-webui always normalises per input column (silently wrong "
                       "broadcast); ComfyUI uses ‖W‖ instead of ‖W+ΔW‖ on this axis (PR #15458); at strength m ≠ 1 "
                       "ComfyUI/sd-webui interpolate W → W_dora linearly while LyCORIS renders (W+ΔW)·(m(g−1)+1) "
                       "(docs/loaders.md#q6-dora-strength); stable-diffusion.cpp ignores dora_scale");
  }
  if ((a == "loha" || a == "lokr") && rank > 0 && !std::isnan(alpha) && alpha != static_cast<double>(rank))
    out.emplace_back("LoHa/LoKr with alpha ≠ rank",
                     "the reference LyCORIS tools/merge.py applies alpha/rank twice (docs/loaders.md#q1-merge-applies-alpha-twice); ComfyUI, sd-webui, "
                     "stable-diffusion.cpp, PEFT and this tool apply it once");
  if (a == "lokr") {
    if (rank == 0 && !std::isnan(alpha) && alpha != 1.0)
      out.emplace_back("LoKr with both factors full",
                       "LyCORIS and ComfyUI ignore alpha (scale 1); PEFT applies lora_alpha/r");
    if (rank == 1 && !std::isnan(alpha) && alpha != 1.0)
      out.emplace_back("rank-1 LoKr", "stable-diffusion.cpp uses scale 1 for rank-1 LoKr (LyCORIS: alpha/1)");
    if (has(t, "lokr_t2"))
      out.emplace_back("LoKr Tucker", "stable-diffusion.cpp leaves lokr_t2 modules unused; the reference LyCORIS "
                                      "loader fails on Tucker LoKr files (docs/loaders.md#q4-lokr-loader-refactorizes)");
    if (has(t, "lokr_w2") && t.at("lokr_w2").dim() > 2)
      out.emplace_back("LoKr conv with a full 4-D lokr_w2",
                       "stable-diffusion.cpp's per-dimension Kronecker puts lokr_w1 on the kernel dimensions "
                       "(unverified by execution)");
  }
  if (a == "lora") {
    if (has(t, "lora_mid.weight"))
      out.emplace_back("LoRA Tucker core", "kohya sd-scripts LoRA has no lora_mid (cannot load it); ComfyUI, sd-webui "
                                           "and stable-diffusion.cpp read it");
    const auto& up = t.at("lora_up.weight");
    if (has(t, "lora_down.weight") && t.at("lora_down.weight").dim() > 2 && up.dim() == 2)
      out.emplace_back("2-D conv lora_up (DyLoRA)", "the reference LyCORIS loader cannot load a 2-D conv lora_up (docs/loaders.md#q23-dylora)");
  }
  if ((a == "lora" || a == "loha" || a == "lokr" || a == "glora") && rank > 0 && std::isnan(alpha))
    out.emplace_back("no alpha", "the reference LyCORIS loader crashes without alpha (docs/loaders.md#q31-loader-crashes); this tool, ComfyUI and "
                                 "sd-webui use scale 1 (alpha = rank)");
  if (a == "diag-oft" || a == "boft") {
    if (!std::isnan(alpha) && alpha != 0)
      out.emplace_back("OFT/BOFT constraint units",
                       "alpha is the constraint: LyCORIS and sd-webui clip ‖Q‖ at alpha·out_features (docs/loaders.md#q20-oft-constraint), "
                       "ComfyUI at alpha (out_features times tighter)");
    if (!std::isnan(alpha) && alpha == 0)
      out.emplace_back("OFT constraint 0", "older sd-webui clamps ‖Q‖ to alpha·out = 0: the adapter does nothing there");
    out.emplace_back("OFT/BOFT strength", "ComfyUI applies the strength twice (s² for Diag-OFT, per factor and again "
                                          "for BOFT), sd-webui linearly on ΔW; all agree at strength 1; PEFT OFT/BOFT "
                                          "files are not compatible; stable-diffusion.cpp has no OFT");
    if (has(t, "rescale"))
      out.emplace_back("OFT rescale", "ComfyUI ignores 'rescale'; LyCORIS applies it fully at any strength (docs/loaders.md#q19-rescale-ignores-multiplier)");
  }
  if (a == "ia3")
    out.emplace_back("(IA)^3", "ComfyUI and stable-diffusion.cpp do not load (IA)^3 ('lora key not loaded'); the "
                               "reference LyCORIS cannot load it (docs/loaders.md#q10-ia3-unreachable); PEFT's ia3_l = 1 + weight; sd-webui does not "
                               "broadcast conv vectors");
  if (a == "glora")
    out.emplace_back("GLoRA", "sd-webui reads the old GLoRA layout (shape error on current files) and ignores alpha; "
                              "PEFT's GLoRA is a different algorithm; stable-diffusion.cpp has no GLoRA");
  if (a == "full" && has(t, "diff_b"))
    out.emplace_back("Full with diff_b", "the reference LyCORIS merge crashes on Full modules with a bias (docs/loaders.md#q24-full-broken)");
  if (a == "norm")
    out.emplace_back("Norm", "sd-webui needs both w_norm and b_norm; stable-diffusion.cpp does not apply them");
  if (a == "glokr") out.emplace_back("GLoKr", "lycoris-cpp's own algorithm (docs/glokr.md): no other loader reads it");
  if (has(t, "bias_indices") || has(t, "bias_values"))
    out.emplace_back("sparse bias", "bias_indices/bias_values/bias_size: this tool adds the dense residual to ΔW "
                                    "(unscaled), every other loader (LyCORIS, ComfyUI, sd-webui, stable-diffusion.cpp) "
                                    "ignores it");
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
  auto layer_id = [](const naming::BaseLayer& l) { return l.weight_key + "#" + std::to_string(l.part); };

  torch::NoGradGuard no_grad;
  for (const auto& m : adapter.modules) {
    CheckModule c;
    c.name = m.name;
    // PEFT modules are looked up under their kohya name (same path, underscored)
    const std::string lookup = adapter.format == AdapterFormat::Peft
                                   ? naming::module_name(component_prefix(m.component, AdapterFormat::Kohya), m.path)
                                   : m.name;
    for (const auto& [suffix, t] : m.tensors)
      if (t.is_floating_point()) {
        const auto bad = (~torch::isfinite(t)).sum().item<int64_t>();
        if (bad > 0) c.problems.push_back("nonfinite: " + suffix + " has " + std::to_string(bad) + " NaN/Inf value(s)");
      }
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
        rules_used.emplace(target->dialect, target->prefix);
        covered.insert(layer_id(target->layer));
        families.insert(family(target->path));
      }
      try {
        for (auto& [topic, text] : loader_notes(m.name, *algo, m.tensors)) {
          auto& n = notes[topic];
          n.topic = topic;
          n.text = text;
          n.modules.push_back(m.name);
        }
      } catch (const Error&) {  // unreadable alpha etc.: already reported as malformed by the loader
      }
    }
    c.status = c.problems.empty() ? "ok" : c.problems.front().substr(0, c.problems.front().find(':'));
    report.modules.push_back(std::move(c));
  }

  // layers the same naming rule reaches, of a family the adapter covers elsewhere, but not covered
  std::set<std::string> seen;
  for (const auto* r : names.all()) {
    if (!rules_used.count({r->dialect, r->prefix}) || !families.count(family(r->path))) continue;
    const auto id = layer_id(r->layer);
    if (covered.count(id) || !seen.insert(id).second) continue;
    report.uncovered.push_back(r->layer.weight_key + (r->layer.fused() ? " (part " + std::to_string(r->layer.part) + ")" : "") +
                               " [" + r->module + "]");
  }
  std::sort(report.uncovered.begin(), report.uncovered.end());
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
    os << "other loaders read this file differently:\n";
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
