// `lycoris convert --for` (see include/lycoris/tools/convert_for.hpp).
#include "lycoris/tools/convert_for.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/svd.hpp"
#include "lycoris/io/output_path.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/text.hpp"
#include "lycoris/tools/check_loader.hpp"
#include "lycoris/tools/convert.hpp"
#include "lycoris/tools/extract.hpp"
#include "lycoris/version.hpp"
#include "tool_checks.hpp"

namespace lycoris::tools {

namespace F = functional;

namespace {

int64_t bytes_of(const NamedTensors& tensors) {
  int64_t n = 0;
  for (const auto& [k, t] : tensors) n += t.numel() * static_cast<int64_t>(t.element_size());
  return n;
}

// The weight of a base layer (its row block when the tensor is fused), in fp32 or wider.
torch::Tensor layer_tensor(const io::SafetensorsFile& base, const std::string& key, const naming::BaseLayer& layer) {
  auto W = base.tensor(key);
  if (layer.fused()) {
    const int64_t rows = W.size(0) / layer.parts;
    W = W.narrow(0, layer.part * rows, rows);
  }
  return W.to(W.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32);
}

// ΔW of a module as the loader should see it: the exact ΔW per unit strength when it is linear in the
// strength (checked at 1/2 and 1), else ΔW at `strength` divided by `strength` (`baked`).
struct Delta {
  torch::Tensor weight, bias;  // bias undefined unless the adapter changes it
  bool baked = false;
};

Delta unit_delta(AdapterImpl& adapter, const torch::Tensor& W, const torch::Tensor& b, double strength) {
  auto per_unit = [&](double m) { return (adapter.apply_weight(W, m) - W) / m; };
  Delta d;
  auto additive = adapter.additive_delta();
  if (additive.defined()) {
    d.weight = additive.to(W.scalar_type());
  } else {
    auto at1 = per_unit(1.0);
    const bool linear = torch::allclose(per_unit(0.5), at1, 1e-4, 1e-6 * (at1.abs().max().item<double>() + 1e-30));
    d.baked = !linear;
    d.weight = linear ? at1 : per_unit(strength);
  }
  if (adapter.changes_bias() && b.defined()) d.bias = (adapter.apply_bias(b, strength) - b) / strength;
  return d;
}

// The numerical rank of D viewed as (O, I·k): singular values above σ₀·max(O, I·k)·ε of its dtype.
int64_t numerical_rank(const torch::Tensor& D) {
  auto S = F::singular_values(F::flat(D)).to(torch::kFloat64);
  if (S.numel() == 0 || S[0].item<double>() == 0) return 0;
  const double eps = D.scalar_type() == torch::kFloat64 ? std::numeric_limits<double>::epsilon()
                                                         : std::numeric_limits<float>::epsilon();
  const double tol = S[0].item<double>() * static_cast<double>(std::max(D.size(0), D.numel() / D.size(0))) * eps;
  return (S > tol).sum().item<int64_t>();
}

// A candidate form is usable when the loader's own table applies it exactly.
bool loader_exact(const LoaderTable& table, const std::string& module, const NamedTensors& tensors, int64_t dims) {
  TensorMap map(tensors.begin(), tensors.end());
  const Algorithm* algo = detect_algorithm(map);
  return algo && combined_verdict(matching_rules(table, algo->name, module_traits(*algo, module, map, dims))) ==
                     Verdict::Exact;
}

// The smallest form of (ΔW, Δb) the loader applies exactly: the LoRA of ΔW's numerical rank when smaller than
// the layer and bias-free, else Full `diff` (+ `diff_b`). Tensors in `dtype`.
NamedTensors exact_form(const LoaderTable& table, const std::string& module, const Delta& d, torch::ScalarType dtype,
                        ConvertForModule& report) {
  const auto& D = d.weight;
  const int64_t dims = D.dim();
  if (dims < 2)  // a norm layer's vector: no other form than the module's own
    throw OptionError(module + ": " + table.title + " applies no exact form of a norm layer's change");
  const int64_t O = D.size(0), I = D.size(1), cols = D.numel() / O;
  if (!d.bias.defined()) {
    const int64_t r = std::max<int64_t>(1, numerical_rank(D));
    if (r <= std::min(O, I) && r * (O + cols) < O * cols) {
      ExtractOptions o;
      o.svd = F::SVDMethod::Full;
      auto fit = fit_locon(D, r, o);
      for (auto& [k, t] : fit.tensors)
        if (k != "alpha") t = round_finite(t, dtype, module, k);
      if (loader_exact(table, module, fit.tensors, dims)) {
        report.form = "lora";
        report.rank = r;
        return fit.tensors;
      }
    }
  }
  NamedTensors full{{"diff", round_finite(D, dtype, module, "diff")}};
  if (d.bias.defined()) full.emplace_back("diff_b", round_finite(d.bias, dtype, module, "diff_b"));
  if (!loader_exact(table, module, full, dims))
    throw OptionError(module + ": " + table.title + " applies neither a LoRA nor a Full diff of this layer exactly");
  report.form = "diff";
  return full;
}

std::string strength_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

torch::ScalarType stored_float_dtype(const TensorMap& t) {
  for (const auto& [k, x] : t)
    if (x.is_floating_point() && k != "alpha") return x.scalar_type();
  return torch::kFloat32;
}

}  // namespace

size_t ConvertForReport::rewritten() const {
  return static_cast<size_t>(
      std::count_if(modules.begin(), modules.end(), [](const ConvertForModule& m) { return m.form != "kept"; }));
}

ConvertForReport convert_for(const std::string& input, const std::string& output, const ConvertForOptions& o) {
  ConvertForReport report;
  report.loader = &find_loader(o.loader);
  if (o.loader != "comfyui" && o.loader != "sdwebui" && o.loader != "sdcpp")
    throw OptionError("convert --for: " + o.loader + " is not a target (comfyui, sdwebui, sdcpp)");
  if (!std::isfinite(o.strength) || o.strength == 0)
    throw OptionError("convert --for: --strength must be finite and non-zero, got " + std::to_string(o.strength));
  io::check_output_path(output);
  const auto in = read_adapter(input);
  if (in.modules.empty()) throw KeyError(input + ": " + no_modules_problem(in.tensors));
  if (!in.stray_keys.empty()) throw KeyError(input + ": " + stray_keys_problem(in.stray_keys));
  for (const auto& n : in.notes) report.warnings.push_back(n);

  std::map<std::string, const AdapterModule*> loaded;
  LoadedAdapter base_adapter;
  std::unique_ptr<io::SafetensorsFile> base;
  if (!o.base.empty()) {
    AdapterLoadOptions lo;
    lo.allow_unmatched = true;
    base_adapter = load_adapter_for_base(input, o.base, lo);
    for (const auto& w : base_adapter.warnings) report.warnings.push_back(w);
    for (const auto& m : base_adapter.modules) loaded[m.name] = &m;
    base = std::make_unique<io::SafetensorsFile>(io::SafetensorsFile::open(o.base));
  }

  torch::NoGradGuard no_grad;
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& m : in.modules) {
    ConvertForModule c;
    c.name = m.name;
    NamedTensors before(m.tensors.begin(), m.tensors.end());
    c.bytes_before = bytes_of(before);
    const Algorithm* algo = detect_algorithm(m.tensors);
    const auto* lm = loaded.count(m.name) ? loaded.at(m.name) : nullptr;
    const int64_t dims = lm ? static_cast<int64_t>(lm->layer.weight_shape().size()) : 0;
    if (algo) {
      c.algo = algo->name;
      const auto traits = module_traits(*algo, m.name, m.tensors, dims);
      c.before = combined_verdict(matching_rules(*report.loader, algo->name, traits));
    } else {
      c.before = Verdict::Refused;
    }
    NamedTensors after = before;
    c.form = "kept";
    if (c.before != Verdict::Exact) {
      if (!algo) throw KeyError(input + ": " + m.name + ": no algorithm recognises its keys: nothing to rewrite from");
      if (!lm)
        throw OptionError(input + ": " + m.name + ": " + report.loader->title + " would not apply it exactly; "
                          "rewriting it needs its base layer (--base, with a layer this module matches)");
      try {
        const auto W = layer_tensor(*base, lm->target.layer.weight_key, lm->target.layer);
        torch::Tensor b;
        if (!lm->target.layer.bias_key.empty())
          b = layer_tensor(*base, lm->target.layer.bias_key, lm->target.layer);
        const auto d = unit_delta(*lm->adapter, W, b, o.strength);
        c.baked = d.baked;
        after = exact_form(*report.loader, m.name, d, stored_float_dtype(m.tensors), c);
      } catch (const OptionError& e) {  // no exact form: kept as it is, said so
        c.note = "kept: no form " + report.loader->title + " applies exactly";
        report.warnings.push_back(e.what());
        after = before;
        c.baked = false;
      } catch (...) {
        rethrow_with_context({input, o.base}, m.name);
      }
      if (c.baked)
        c.note = "baked at strength " + strength_text(o.strength) + ": exact when loaded at that strength only";
    }
    c.bytes_after = bytes_of(after);
    for (const auto& [suffix, t] : after) tensors.emplace_back(m.name + "." + suffix, t.contiguous());
    report.modules.push_back(std::move(c));
  }
  auto metadata = in.metadata;
  nlohmann::json record = {{"tool", std::string("lycoris-cpp ") + LYCORIS_VERSION},
                           {"for", o.loader},
                           {"strength", o.strength},
                           {"rewritten", report.rewritten()},
                           {"file", std::filesystem::path(input).filename().string()}};
  metadata["lycoris_convert"] = record.dump();
  io::save_file(output, tensors, metadata);
  return report;
}

std::string ConvertForReport::json() const {
  nlohmann::ordered_json j;
  j["loader"] = loader->name;
  j["rewritten"] = rewritten();
  j["modules"] = nlohmann::json::array();
  for (const auto& m : modules)
    j["modules"].push_back(nlohmann::ordered_json{{"name", m.name},
                                                  {"algo", m.algo},
                                                  {"before", to_string(m.before)},
                                                  {"form", m.form},
                                                  {"rank", m.rank},
                                                  {"bytes_before", m.bytes_before},
                                                  {"bytes_after", m.bytes_after},
                                                  {"baked", m.baked},
                                                  {"note", m.note}});
  j["warnings"] = warnings;
  return j.dump(2);
}

std::string ConvertForReport::text() const {
  std::ostringstream os;
  int64_t before = 0, after = 0;
  for (const auto& m : modules) {
    before += m.bytes_before;
    after += m.bytes_after;
    if (m.form == "kept") continue;
    os << escape_control(m.name) << "  " << m.algo << " (" << to_string(m.before) << ") -> " << m.form;
    if (m.form == "lora") os << " rank " << m.rank;
    os << "  " << m.bytes_before << " B -> " << m.bytes_after << " B";
    if (!m.note.empty()) os << "  (" << m.note << ")";
    os << "\n";
  }
  os << rewritten() << " of " << modules.size() << " module(s) rewritten for " << loader->title << "; "
     << before << " B -> " << after << " B" << "\n";
  return os.str();
}

}  // namespace lycoris::tools
