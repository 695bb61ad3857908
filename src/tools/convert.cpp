// `lycoris convert` (see include/lycoris/tools/convert.hpp).
#include "lycoris/tools/convert.hpp"

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "lycoris/algorithms.hpp"
#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/output_path.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/text.hpp"
#include "lycoris/version.hpp"

namespace lycoris::tools {

namespace F = functional;

namespace {

const std::set<std::string>& sparse_bias_suffixes() {
  static const std::set<std::string> s = {"bias_indices", "bias_values", "bias_size"};
  return s;
}

const std::set<std::string>& lycoris_suffixes() {
  static const std::set<std::string> s = [] {
    std::set<std::string> all(sparse_bias_suffixes());
    for (const auto& a : algorithms()) all.insert(a.suffixes.begin(), a.suffixes.end());
    return all;
  }();
  return s;
}

bool is_peft_key(const std::string& key) {
  if (naming::peft_only_suffix(key)) return true;
  for (const auto& [p, c] : naming::peft_prefixes())
    if (starts_with(key, p)) return true;
  const auto dot = key.find('.');
  // "lora_unet_…", "lycoris_…": a LyCORIS/kohya module, whatever its suffix
  for (const auto& [p, c] : naming::module_prefixes())
    if (starts_with(key, p + "_") && (dot == std::string::npos || dot > p.size() + 1)) return false;
  // a bare dotted path ("down_blocks.0.….hada_w1_a"): the text after the first '.' is no LyCORIS suffix
  return dot != std::string::npos && !lycoris_suffixes().count(key.substr(dot + 1));
}

// adapter_config.json of a PEFT adapter directory, if present.
struct PeftConfig {
  bool found = false;
  double alpha = 8, r = 8;
  bool rslora = false;
  std::vector<std::pair<std::string, double>> alpha_pattern, rank_pattern;

  // PEFT matches pattern keys against the end of the module path (".*\.<key>$" or the whole path).
  static const double* match(const std::vector<std::pair<std::string, double>>& patterns, const std::string& path) {
    for (const auto& [k, v] : patterns) {
      if (path == k || ends_with(path, "." + k)) return &v;
      try {
        if (std::regex_match(path, std::regex("(.*\\.)?" + k))) return &v;
      } catch (const std::regex_error&) {
      }
    }
    return nullptr;
  }
  // PEFT's scaling of a module: lora_alpha / r (or / sqrt(r) with rs-LoRA).
  double scale(const std::string& path) const {
    const double* a = match(alpha_pattern, path);
    const double* rr = match(rank_pattern, path);
    const double al = a ? *a : alpha, rk = rr ? *rr : r;
    return rslora ? al / std::sqrt(rk) : al / rk;
  }
};

PeftConfig read_peft_config(const std::string& adapter_path) {
  PeftConfig c;
  const auto file = std::filesystem::path(adapter_path).parent_path() / "adapter_config.json";
  std::ifstream in(file);
  if (!in) return c;
  auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw FormatError(file.string() + ": not a JSON object");
  c.found = true;
  if (j.contains("r") && j["r"].is_number()) c.r = j["r"].get<double>();
  c.alpha = c.r;
  if (j.contains("lora_alpha") && j["lora_alpha"].is_number()) c.alpha = j["lora_alpha"].get<double>();
  else if (j.contains("alpha") && j["alpha"].is_number()) c.alpha = j["alpha"].get<double>();
  if (j.contains("use_rslora") && j["use_rslora"].is_boolean()) c.rslora = j["use_rslora"].get<bool>();
  for (auto [field, out] : {std::make_pair("alpha_pattern", &c.alpha_pattern), std::make_pair("rank_pattern", &c.rank_pattern)})
    if (j.contains(field) && j[field].is_object())
      for (auto it = j[field].begin(); it != j[field].end(); ++it)
        if (it.value().is_number()) out->emplace_back(it.key(), it.value().get<double>());
  return c;
}

// LyCORIS scale of a module: alpha / rank (rank from the stored shapes); 1 without alpha or rank
// (LoKr with both factors full ignores alpha, docs/format.md#alpha).
double lycoris_scale(const Algorithm& algo, const std::string& name, const TensorMap& t) {
  const int64_t r = algo.rank ? algo.rank(t) : 0;
  auto it = t.find("alpha");
  if (r <= 0 || it == t.end()) return 1.0;
  return F::scalar_value(it->second, name, "alpha") / static_cast<double>(r);
}

// PEFT modules: shapes restored and alpha made explicit, by the algorithm's registry entry.
void finish_peft_module(NamedModule& m, const PeftConfig& cfg, AdapterContents& out, bool& noted_default) {
  const Algorithm* algo = detect_algorithm(m.tensors);
  if (!algo || !algo->from_peft) return;
  double s = 1.0;
  if (m.tensors.count("alpha")) {
  } else if (cfg.found) {
    s = cfg.scale(m.path);
  } else if (!noted_default) {
    out.notes.push_back("no alpha keys and no adapter_config.json next to the file: PEFT scale 1 (lora_alpha = r) assumed");
    noted_default = true;
  }
  algo->from_peft(m.tensors, s);
}

}  // namespace

AdapterContents read_adapter(const std::string& path) {
  const auto file = io::SafetensorsFile::open(path);
  AdapterContents out;
  out.path = path;
  out.metadata = file.metadata();
  out.tensors = file.tensors().size();
  size_t peft = 0, other = 0;
  for (const auto& info : file.tensors()) (is_peft_key(info.name) ? peft : other)++;
  if (peft && other) {
    std::string example;
    for (const auto& info : file.tensors())
      if (is_peft_key(info.name)) {
        example = info.name;
        break;
      }
    throw FormatError(path + ": mixes PEFT/diffusers keys (e.g. '" + example + "') with LyCORIS/kohya keys");
  }
  std::map<std::string, NamedModule> modules;
  if (peft) {
    out.format = AdapterFormat::Peft;
    const PeftConfig cfg = read_peft_config(path);
    bool has_te2 = false;
    for (const auto& info : file.tensors()) has_te2 |= starts_with(info.name, naming::peft_component_prefix("te2"));
    for (const auto& info : file.tensors()) {
      std::string module, suffix;
      for (const auto& [ps, ls] : naming::peft_suffixes())
        if (ends_with(info.name, "." + ps)) {
          module = info.name.substr(0, info.name.size() - ps.size() - 1);
          suffix = ls;
          break;
        }
      if (module.empty())
        throw FormatError(path + ": tensor '" + info.name + "': unknown PEFT/diffusers suffix (known: lora_A/lora_B"
                          ".weight, lora.down/up.weight, lora_magnitude_vector, alpha, hada_*, lokr_*)");
      auto& m = modules[module];
      if (m.name.empty()) {
        m.name = module;
        std::tie(m.component, m.path) = naming::split_peft_path(module, has_te2);
        if (m.component.empty()) m.component = "model";
        m.underscored = naming::underscored(m.path);
      }
      if (m.tensors.count(suffix)) throw FormatError(path + ": module '" + module + "' has two '" + suffix + "' tensors");
      m.tensors[suffix] = file.tensor(info.name);
    }
    bool noted = false;
    for (auto& [n, m] : modules) finish_peft_module(m, cfg, out, noted);
    if (cfg.found) out.notes.push_back("alphas from adapter_config.json (lora_alpha/r, alpha_pattern, rank_pattern)");
  } else {
    bool lycoris = false;
    for (auto& [name, tensors] : group_modules(file, &out.stray_keys)) {
      auto& m = modules[name];
      m.name = name;
      std::tie(m.component, m.underscored) = naming::split_module_name(name);
      lycoris |= m.component == "model";
      m.tensors = std::move(tensors);
    }
    out.format = lycoris ? AdapterFormat::Lycoris : AdapterFormat::Kohya;
  }
  for (auto& [n, m] : modules) out.modules.push_back(std::move(m));
  return out;
}

namespace {

// Dotted paths for LyCORIS/kohya modules: through the base's naming dialects, else guessed.
void fill_paths(AdapterContents& in, const ConvertOptions& o, ConvertReport& report) {
  std::vector<std::string> unmatched;
  std::unique_ptr<naming::Resolver> names;
  if (!o.base.empty()) names = std::make_unique<naming::Resolver>(io::SafetensorsFile::open(o.base).names(), o.base_format);
  for (auto& m : in.modules) {
    if (!m.path.empty() || m.component.empty()) continue;
    if (names) {
      auto hits = names->find(m.name);
      std::set<std::string> paths;
      for (const auto* h : hits) paths.insert(h->path);
      if (paths.size() == 1) {
        m.path = *paths.begin();
        continue;
      }
      if (paths.empty()) {
        auto near = names->closest(m.name, 2);
        std::string s;
        for (const auto& n : near) s += (s.empty() ? "" : ", ") + n;
        unmatched.push_back(m.name + " (closest: " + s + ")");
      } else {
        std::string s;
        for (const auto& p : paths) s += (s.empty() ? "" : ", ") + p;
        unmatched.push_back(m.name + " (ambiguous: " + s + ")");
      }
      continue;
    }
    m.path = naming::guess_path(m.underscored);
    ++report.guessed_paths;
  }
  if (!unmatched.empty()) {
    std::string s;
    for (size_t i = 0; i < unmatched.size() && i < 10; ++i) s += (i ? "; " : "") + unmatched[i];
    if (unmatched.size() > 10) s += "; … and " + std::to_string(unmatched.size() - 10) + " more";
    throw KeyError(in.path + ": " + std::to_string(unmatched.size()) + " module(s) match no layer of " + o.base + ": " + s);
  }
  if (report.guessed_paths)
    report.warnings.push_back(std::to_string(report.guessed_paths) +
                              " dotted path(s) guessed from underscored names (pass --base for exact paths)");
  // PEFT/diffusers U-Net paths are diffusers paths: map kohya's SDXL (SGM) names through the U-Net table
  static const std::set<std::string> sgm_roots = {"input_blocks", "middle_block", "output_blocks", "time_embed",
                                                  "label_emb", "out"};
  auto root = [](const std::string& p) { return p.substr(0, p.find('.')); };
  std::vector<std::string> sgm;
  bool has_blocks = false;
  for (const auto& m : in.modules)
    if (m.component == "unet" && sgm_roots.count(root(m.path))) {
      sgm.push_back(m.path);
      has_blocks |= root(m.path) != "out";
    }
  if (!has_blocks) return;
  if (const auto* table = naming::unet_table_for(sgm, true))
    for (auto& m : in.modules)
      if (m.component == "unet" && sgm_roots.count(root(m.path)))
        if (auto d = table->to_diffusers(m.path)) m.path = *d;
}

}  // namespace

ConvertReport convert(const std::string& input, const std::string& output, const ConvertOptions& o) {
  io::check_output_path(output);
  ConvertReport report;
  auto in = read_adapter(input);
  if (in.modules.empty()) throw KeyError(input + ": " + no_modules_problem(in.tensors));
  // converted, they would be dropped without a word
  if (!in.stray_keys.empty()) throw KeyError(input + ": " + stray_keys_problem(in.stray_keys));
  report.from = in.format;
  for (const auto& n : in.notes) report.warnings.push_back(n);
  {
    std::vector<std::string> unknown;
    for (const auto& m : in.modules)
      if (m.component.empty()) unknown.push_back(m.name);
    if (!unknown.empty())
      throw KeyError(input + ": " + std::to_string(unknown.size()) + " module name(s) with no known prefix (lycoris_, "
                     "lora_unet_, lora_te_, lora_te1_, lora_te2_, lora_te3_), e.g. '" + unknown.front() + "'");
  }
  if (o.to == AdapterFormat::Peft) fill_paths(in, o, report);

  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::vector<std::string> refused;
  size_t dropped_sparse = 0;
  torch::NoGradGuard no_grad;
  for (auto& m : in.modules) {
    if (o.to != AdapterFormat::Peft) {
      const auto name = naming::module_name(naming::component_prefix(m.component, o.to), m.path.empty() ? m.underscored : m.path);
      for (const auto& [suffix, t] : m.tensors) tensors.emplace_back(name + "." + suffix, t);
      continue;
    }
    const Algorithm* algo = detect_algorithm(m.tensors);
    if (!algo || !algo->to_peft) {
      refused.push_back(m.name + ": " + (algo ? algo->peft_refusal : std::string("no known algorithm")));
      continue;
    }
    TensorMap own;  // the algorithm's tensors; sparse-bias residuals have no PEFT equivalent
    bool unknown = false;
    for (const auto& [suffix, t] : m.tensors) {
      if (sparse_bias_suffixes().count(suffix)) {
        ++dropped_sparse;
      } else if (std::find(algo->suffixes.begin(), algo->suffixes.end(), suffix) == algo->suffixes.end()) {
        refused.push_back(m.name + ": key '" + suffix + "' has no PEFT equivalent");
        unknown = true;
      } else {
        own.emplace(suffix, t);
      }
    }
    if (unknown) continue;
    const double s = lycoris_scale(*algo, m.name, m.tensors);
    auto form = algo->to_peft(own, s);
    if (!form.refusal.empty()) {
      refused.push_back(m.name + ": " + form.refusal);
      continue;
    }
    if (s != 1.0) ++report.folded;
    const std::string base = naming::peft_component_prefix(m.component) + m.path + ".";
    for (const auto& [suffix, t] : form.tensors) tensors.emplace_back(base + naming::peft_key_suffix(suffix), t.contiguous());
  }
  if (!refused.empty()) {
    std::string s;
    for (size_t i = 0; i < refused.size() && i < 10; ++i) s += (i ? "; " : "") + refused[i];
    if (refused.size() > 10) s += "; … and " + std::to_string(refused.size() - 10) + " more";
    throw OptionError(input + ": " + std::to_string(refused.size()) + " module(s) cannot be expressed in " +
                      to_string(o.to) + ": " + s);
  }
  if (dropped_sparse)
    report.warnings.push_back(std::to_string(dropped_sparse) + " sparse-bias tensor(s) dropped (no PEFT equivalent; "
                              "the PEFT file lacks the residual that merges here add to ΔW)");
  {  // two modules may not collapse onto one name (e.g. lora_te_x and lora_te1_x both → text_encoder.x)
    std::set<std::string> seen;
    for (const auto& [k, t] : tensors)
      if (!seen.insert(k).second) throw KeyError(input + ": two modules become the same key '" + k + "' in " + to_string(o.to));
  }
  std::map<std::string, std::string> metadata;
  if (o.to != AdapterFormat::Peft) metadata = in.metadata;
  else metadata["format"] = "pt";
  nlohmann::json record = {{"tool", std::string("lycoris-cpp ") + LYCORIS_VERSION},
                           {"from", to_string(in.format)},
                           {"to", to_string(o.to)},
                           {"file", std::filesystem::path(input).filename().string()}};
  metadata["lycoris_convert"] = record.dump();
  io::save_file(output, tensors, metadata);
  report.modules = in.modules.size();
  report.tensors = tensors.size();
  return report;
}

}  // namespace lycoris::tools
