// The loader rule tables (tools/loader_rules.hpp), `check --loader` and `convert --for` on the golden cases.
// Expected verdicts are written by hand from the rules in docs/loaders.md#matrix and the golden files' layouts
// (tests/data/golden/README.md): 6 Linear, a 3×3 Conv2d, a 1×1 Conv2d and a k3 Conv1d per case.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/tools/check_loader.hpp"
#include "lycoris/tools/convert_for.hpp"
#include "test_util.hpp"

namespace loader_rules_test {

using namespace lycoris;
using tools::Verdict;

std::string golden(const std::string& c, const std::string& file) {
  return test::data_path("golden/" + c + "/" + file + ".safetensors");
}

// "exact/differs/ignored/refused" module counts.
std::string counts(const tools::LoaderCheckReport& r) {
  std::ostringstream os;
  os << r.count(Verdict::Exact) << "/" << r.count(Verdict::Differs) << "/" << r.count(Verdict::Ignored) << "/"
     << r.count(Verdict::Refused);
  return os.str();
}

TEST(LoaderRules, EveryRuleNamesKnownTraitsAndAlgorithms) {
  std::set<std::string> traits, algos{"*"};
  for (const auto& [name, meaning] : known_traits()) {
    EXPECT_FALSE(meaning.empty()) << name;
    EXPECT_TRUE(traits.insert(name).second) << "twice: " << name;
  }
  for (const auto& a : algorithms()) algos.insert(a.name);
  std::set<std::string> loaders;
  for (const auto& t : tools::loader_tables()) {
    SCOPED_TRACE(t.name);
    EXPECT_TRUE(loaders.insert(t.name).second);
    EXPECT_FALSE(t.version.empty());
    EXPECT_FALSE(t.repo.empty());
    for (const auto& a : t.reads) EXPECT_TRUE(algos.count(a)) << a;
    auto rules = t.rules;
    rules.push_back(t.otherwise);
    for (const auto& r : rules) {
      SCOPED_TRACE(r.topic);
      EXPECT_TRUE(algos.count(r.algo)) << r.algo;
      EXPECT_FALSE(r.code.empty());
      EXPECT_FALSE(r.how.empty());
      for (const auto& w : r.when) EXPECT_TRUE(traits.count(w)) << w;
      for (const auto& w : r.unless) EXPECT_TRUE(traits.count(w)) << w;
      if (r.only_off_unit_strength) EXPECT_EQ(r.verdict, Verdict::Differs);
    }
  }
  EXPECT_EQ(loaders, (std::set<std::string>{"comfyui", "sdwebui", "sdcpp", "kohya", "peft", "lycoris-py"}));
  EXPECT_THROW(tools::find_loader("invokeai"), OptionError);
}

// Module verdict counts "exact/differs/ignored/refused" per golden case and loader, derived by hand from the
// rules: e.g. ComfyUI on lokr: the Conv1d's whole 3-D lokr_w2 (wrong Kronecker placement) differs, the rest is
// exact; sd-webui refuses LoRA on Conv1d; stable-diffusion.cpp ignores Tucker LoKr; kohya reads LoRA only.
TEST(LoaderRules, GoldenVerdictsPerLoader) {
  // case → {comfyui, sdwebui, sdcpp, kohya, peft, lycoris-py}
  const std::map<std::string, std::vector<std::string>> expected = {
      {"lora", {"9/0/0/0", "8/0/0/1", "9/0/0/0", "8/0/1/0", "9/0/0/0", "9/0/0/0"}},
      {"lora_rs", {"9/0/0/0", "8/0/0/1", "9/0/0/0", "8/0/1/0", "9/0/0/0", "9/0/0/0"}},
      {"lora_scalar_fp16", {"9/0/0/0", "8/0/0/1", "9/0/0/0", "8/0/1/0", "9/0/0/0", "9/0/0/0"}},
      {"lora_tucker", {"8/0/0/1", "8/0/0/1", "9/0/0/0", "7/0/0/2", "7/0/0/2", "9/0/0/0"}},
      {"lora_dora", {"0/9/0/0", "0/8/0/1", "0/9/0/0", "0/8/1/0", "0/9/0/0", "9/0/0/0"}},
      {"lora_dora_wd_in", {"0/9/0/0", "0/8/0/1", "0/9/0/0", "0/8/1/0", "0/0/0/9", "0/0/0/9"}},
      {"dylora", {"6/0/0/0", "6/0/0/0", "6/0/0/0", "6/0/0/0", "6/0/0/0", "6/0/0/0"}},
      {"dylora_conv", {"9/0/0/0", "8/0/0/1", "9/0/0/0", "6/0/0/3", "9/0/0/0", "6/0/0/3"}},
      {"loha", {"9/0/0/0", "9/0/0/0", "9/0/0/0", "0/0/9/0", "9/0/0/0", "9/0/0/0"}},
      {"loha_alpha", {"9/0/0/0", "9/0/0/0", "9/0/0/0", "0/0/9/0", "9/0/0/0", "0/9/0/0"}},
      {"loha_tucker", {"8/0/0/1", "8/0/0/1", "9/0/0/0", "0/0/9/0", "9/0/0/0", "9/0/0/0"}},
      {"lokr", {"8/1/0/0", "8/0/0/1", "6/3/0/0", "0/0/9/0", "2/7/0/0", "9/0/0/0"}},
      {"lokr_alpha", {"8/1/0/0", "8/0/0/1", "6/3/0/0", "0/0/9/0", "2/7/0/0", "7/2/0/0"}},
      {"lokr_f4", {"8/1/0/0", "8/0/0/1", "6/3/0/0", "0/0/9/0", "2/7/0/0", "9/0/0/0"}},
      {"lokr_full", {"8/1/0/0", "8/0/0/1", "6/3/0/0", "0/0/9/0", "0/9/0/0", "9/0/0/0"}},
      {"lokr_both", {"9/0/0/0", "9/0/0/0", "9/0/0/0", "0/0/9/0", "9/0/0/0", "9/0/0/0"}},
      {"lokr_f8", {"9/0/0/0", "9/0/0/0", "9/0/0/0", "0/0/9/0", "9/0/0/0", "9/0/0/0"}},
      {"lokr_tucker", {"7/0/0/2", "8/0/0/1", "7/0/2/0", "0/0/9/0", "9/0/0/0", "7/0/0/2"}},
      {"full", {"9/0/0/0", "9/0/0/0", "9/0/0/0", "0/0/9/0", "0/0/0/9", "3/0/0/6"}},
      {"full_nobias", {"9/0/0/0", "9/0/0/0", "9/0/0/0", "0/0/9/0", "0/0/0/9", "9/0/0/0"}},
      {"ia3", {"0/0/9/0", "6/0/0/3", "0/0/9/0", "0/0/9/0", "0/0/0/9", "0/0/0/9"}},
      {"ia3_input", {"0/0/9/0", "6/0/0/3", "0/0/9/0", "0/0/9/0", "0/0/0/9", "0/0/0/9"}},
      {"glora", {"9/0/0/0", "0/0/0/9", "0/0/9/0", "0/0/9/0", "0/0/0/9", "9/0/0/0"}},
      {"diag_oft", {"0/9/0/0", "9/0/0/0", "0/0/9/0", "0/0/9/0", "0/0/0/9", "9/0/0/0"}},
      {"diag_oft_constraint", {"0/9/0/0", "9/0/0/0", "0/0/9/0", "0/0/9/0", "0/0/0/9", "9/0/0/0"}},
      {"diag_oft_rescaled", {"0/9/0/0", "0/9/0/0", "0/0/9/0", "0/0/9/0", "0/0/0/9", "9/0/0/0"}},
      {"boft", {"0/9/0/0", "0/9/0/0", "0/0/9/0", "0/0/9/0", "0/0/0/9", "9/0/0/0"}},
      {"boft_constraint", {"0/9/0/0", "0/9/0/0", "0/0/9/0", "0/0/9/0", "0/0/0/9", "9/0/0/0"}},
      {"boft_rescaled", {"0/9/0/0", "0/9/0/0", "0/0/9/0", "0/0/9/0", "0/0/0/9", "9/0/0/0"}},
      {"norm", {"12/0/0/0", "11/0/0/1", "9/0/3/0", "8/0/4/0", "9/0/0/3", "12/0/0/0"}},
  };
  const std::vector<std::string> loaders = {"comfyui", "sdwebui", "sdcpp", "kohya", "peft", "lycoris-py"};
  for (const auto& [c, per_loader] : expected)
    for (size_t i = 0; i < loaders.size(); ++i) {
      SCOPED_TRACE(c + " / " + loaders[i]);
      const auto r = tools::check_loader(golden(c, "adapter"), loaders[i]);
      EXPECT_EQ(counts(r), per_loader[i]) << r.text();
      EXPECT_EQ(r.exact(), r.count(Verdict::Exact) == r.modules.size());
    }
}

// Strengths and the rules that decide single modules: the DoRA norm differs at every strength, the DoRA
// strength rule only off 1; Diag-OFT's s² only off 1, its rescale and constraint at every strength.
TEST(LoaderRules, RulesOfSingleModules) {
  auto topics = [](const tools::LoaderModuleVerdict& m) {
    std::map<std::string, bool> t;  // topic → only off unit strength
    for (const auto* r : m.rules) t[r->topic] = r->only_off_unit_strength;
    return t;
  };
  auto dora = tools::check_loader(golden("lora_dora", "adapter"), "comfyui");
  EXPECT_EQ(topics(dora.modules.at(0)), (std::map<std::string, bool>{{"DoRA norm", false}, {"DoRA strength", true}}));
  auto oft = tools::check_loader(golden("diag_oft_rescaled", "adapter"), "comfyui");
  EXPECT_EQ(topics(oft.modules.at(0)),
            (std::map<std::string, bool>{{"Diag-OFT rescale", false}, {"Diag-OFT strength", true}}));
  auto constrained = tools::check_loader(golden("diag_oft_constraint", "adapter"), "comfyui");
  EXPECT_EQ(topics(constrained.modules.at(0)),
            (std::map<std::string, bool>{{"OFT constraint", false}, {"Diag-OFT strength", true}}));
  // the Conv1d of lokr: trait from lokr_w2's 3 dims; with the base the kind comes from the base layer
  auto lokr = tools::check_loader(golden("lokr", "adapter"), "comfyui", golden("lokr", "base"));
  for (const auto& m : lokr.modules) {
    SCOPED_TRACE(m.name);
    const bool conv1d = m.name == "lycoris_temporal_conv";
    EXPECT_EQ(m.verdict, conv1d ? Verdict::Differs : Verdict::Exact);
    EXPECT_EQ(std::count(m.traits.begin(), m.traits.end(), "conv1d"), conv1d ? 1 : 0);
  }
}

TEST(LoaderRules, CliExitCodesAndJson) {
  auto run = test::run_cli({"check", golden("lora", "adapter"), "--loader", "comfyui"});
  EXPECT_EQ(run.code, 0) << run.out << run.err;
  EXPECT_NE(run.out.find("APPLIED EXACTLY  lycoris_temporal_conv  lora"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("reproduces every module"), std::string::npos) << run.out;

  run = test::run_cli({"check", golden("lokr_tucker", "adapter"), "--loader", "comfyui", "--base",
                       golden("lokr_tucker", "base")});
  EXPECT_EQ(run.code, 1) << run.out << run.err;
  EXPECT_NE(run.out.find("REFUSED  lycoris_temporal_conv  lokr"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("Tucker on Conv1d"), std::string::npos) << run.out;

  // a difference only at strength ≠ 1 still fails: the loader must match at every strength
  run = test::run_cli({"check", golden("boft", "adapter"), "--loader", "comfyui", "--json"});
  EXPECT_EQ(run.code, 1) << run.err;
  auto j = nlohmann::json::parse(run.out);
  EXPECT_EQ(j["loader"]["name"], "comfyui");
  EXPECT_FALSE(j["exact"].get<bool>());
  EXPECT_EQ(j["counts"]["differs"], 9);
  EXPECT_EQ(j["modules"][0]["verdict"], "differs");
  EXPECT_EQ(j["modules"][0]["rules"][0]["strengths"], "not 1");
  EXPECT_TRUE(j["modules"][0]["rules"][0]["verified"].get<bool>());

  // unverified rules say so
  run = test::run_cli({"check", golden("lora_dora", "adapter"), "--loader", "sdcpp"});
  EXPECT_EQ(run.code, 1);
  EXPECT_NE(run.out.find("unverified"), std::string::npos) << run.out;

  run = test::run_cli({"check", golden("lora", "adapter"), "--loader", "invokeai"});
  EXPECT_EQ(run.code, 2);
  EXPECT_NE(run.err.find("unknown loader 'invokeai'"), std::string::npos) << run.err;
  run = test::run_cli({"check", golden("lora", "adapter")});
  EXPECT_EQ(run.code, 2);
  EXPECT_NE(run.err.find("--base is required"), std::string::npos) << run.err;
}

// ΔW of every module of `adapter` on `base` at strength m (the library's own rendering).
std::map<std::string, torch::Tensor> deltas(const std::string& adapter, const std::string& base, double m) {
  torch::NoGradGuard no_grad;
  auto loaded = load_adapter_for_base(adapter, base);
  auto file = io::SafetensorsFile::open(base);
  std::map<std::string, torch::Tensor> out;
  for (auto& mod : loaded.modules) {
    auto W = file.tensor(mod.target.layer.weight_key).to(torch::kFloat64);
    out[mod.target.layer.weight_key] = mod.adapter->apply_weight(W, m) - W;
  }
  return out;
}

void expect_same_deltas(const std::string& a, const std::string& b, const std::string& base, double m) {
  const auto da = deltas(a, base, m), db = deltas(b, base, m);
  ASSERT_EQ(da.size(), db.size());
  for (const auto& [key, d] : da) {
    const double scale = d.abs().max().item<double>() + 1e-12;
    EXPECT_TRUE(test::excess(db.at(key), d, 1e-5 * scale, 1e-4) <= 0) << key << " at strength " << m;
  }
}

// Every module the loader would misapply is rewritten, the result keeps ΔW at strength 1 (and at 0.7 where no
// module is baked) and `check --loader` calls it exact.
TEST(LoaderRules, ConvertForKeepsDeltaAndIsExact) {
  const auto dir = test::temp_dir("convert-for");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"lora_tucker", "comfyui"}, {"loha_tucker", "comfyui"}, {"lokr", "comfyui"},   {"lokr_tucker", "comfyui"},
      {"ia3", "comfyui"},         {"lora_dora", "comfyui"},   {"diag_oft", "comfyui"}, {"boft_rescaled", "comfyui"},
      {"lora", "sdwebui"},        {"glora", "sdwebui"},       {"ia3", "sdwebui"},     {"lokr_tucker", "sdcpp"},
      {"diag_oft", "sdcpp"},
  };
  for (const auto& [c, loader] : cases) {
    SCOPED_TRACE(c + " for " + loader);
    const auto out = dir + "/" + c + "_" + loader + ".safetensors";
    tools::ConvertForOptions o;
    o.loader = loader;
    o.base = golden(c, "base");
    auto r = tools::convert_for(golden(c, "adapter"), out, o);
    const auto before = tools::check_loader(golden(c, "adapter"), loader, o.base);
    EXPECT_EQ(r.rewritten(), r.modules.size() - before.count(Verdict::Exact)) << r.text();
    const auto after = tools::check_loader(out, loader, o.base);
    EXPECT_TRUE(after.exact()) << after.text();
    expect_same_deltas(golden(c, "adapter"), out, o.base, 1.0);
    bool baked = false;
    for (const auto& m : r.modules) baked = baked || m.baked;
    if (!baked) expect_same_deltas(golden(c, "adapter"), out, o.base, 0.7);
  }
}

// A strength-dependent module converted at --strength 0.7 gives our ΔW at 0.7 when loaded at 0.7.
TEST(LoaderRules, ConvertForBakesAtStrength) {
  const auto dir = test::temp_dir("convert-for-strength");
  for (const std::string c : {"lora_dora", "boft"}) {
    SCOPED_TRACE(c);
    const auto out = dir + "/" + c + ".safetensors";
    auto run = test::run_cli({"convert", golden(c, "adapter"), "--for", "comfyui", "--base", golden(c, "base"),
                              "--strength", "0.7", "-o", out, "--json"});
    ASSERT_EQ(run.code, 0) << run.err;
    auto j = nlohmann::json::parse(run.out);
    EXPECT_EQ(j["rewritten"], 9);
    EXPECT_TRUE(j["modules"][0]["baked"].get<bool>());
    EXPECT_GT(j["modules"][0]["bytes_after"].get<int64_t>(), 0);
    expect_same_deltas(golden(c, "adapter"), out, golden(c, "base"), 0.7);
  }
  // without a base, a module to rewrite names itself; --strength 0 is refused; kohya is no target
  auto run = test::run_cli({"convert", golden("ia3", "adapter"), "--for", "comfyui", "-o", dir + "/x.safetensors"});
  EXPECT_EQ(run.code, 2);
  EXPECT_NE(run.err.find("needs its base layer"), std::string::npos) << run.err;
  run = test::run_cli({"convert", golden("lora", "adapter"), "--for", "comfyui", "--strength", "0", "-o",
                       dir + "/y.safetensors"});
  EXPECT_EQ(run.code, 2);
  run = test::run_cli({"convert", golden("lora", "adapter"), "--for", "kohya", "-o", dir + "/z.safetensors"});
  EXPECT_EQ(run.code, 2);
  EXPECT_EQ(test::listing(dir).size(), 2u);  // the two converted files only
}

}  // namespace loader_rules_test
