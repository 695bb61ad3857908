// `lycoris check`: a crafted adapter with one misspelled module (suggestion), one wrongly shaped module and a
// NaN; the uncovered layers of covered families; clean golden adapters; the loader notes of DoRA / OFT /
// LoHa α≠r / (IA)^3 files; ldm bases (incl. fused OpenCLIP q/k/v rows) and PEFT adapters; exit codes
// 0 / 1 / 2 and the JSON report through the CLI.
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"
#include "lycoris/tools/check.hpp"
#include "test_util.hpp"

namespace check_test {

using namespace lycoris;
using lycoris::test::run_cli;

const tools::CheckModule& module(const tools::CheckReport& r, const std::string& name) {
  for (const auto& m : r.modules)
    if (m.name == name) return m;
  throw std::runtime_error("no module " + name);
}

const std::string kTB = "down_blocks.0.attentions.0.transformer_blocks.";

struct Crafted {
  std::string dir, base, adapter;
};

// Base: two transformer blocks with q/k/v/out (8×8). Adapter (kohya LoRA, rank 2): block 0 all four
// (v has a NaN), block 1 only q and a k whose lora_up has 9 rows, plus "…to_qq" (a typo).
Crafted crafted() {
  Crafted c;
  c.dir = test::temp_dir("check-crafted");
  c.base = c.dir + "/base.safetensors";
  c.adapter = c.dir + "/adapter.safetensors";
  std::vector<std::pair<std::string, torch::Tensor>> base, a;
  for (int b = 0; b < 2; ++b)
    for (const std::string p : {"to_q", "to_k", "to_v", "to_out.0"})
      base.emplace_back(kTB + std::to_string(b) + ".attn1." + p + ".weight", torch::randn({8, 8}));
  base.emplace_back(kTB + "0.attn1.to_out.0.bias", torch::zeros({8}));
  io::save_file(c.base, base);
  auto add = [&](const std::string& name, int64_t out_rows, bool nan) {
    auto down = torch::randn({2, 8});
    if (nan) down[1][3] = std::numeric_limits<float>::quiet_NaN();
    a.emplace_back(name + ".lora_down.weight", down);
    a.emplace_back(name + ".lora_up.weight", torch::randn({out_rows, 2}));
    a.emplace_back(name + ".alpha", torch::tensor(1.f));
  };
  const std::string p0 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_";
  const std::string p1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_";
  add(p0 + "to_q", 8, false);
  add(p0 + "to_k", 8, false);
  add(p0 + "to_v", 8, true);
  add(p0 + "to_out_0", 8, false);
  add(p1 + "to_q", 8, false);
  add(p1 + "to_k", 9, false);
  add(p0 + "to_qq", 8, false);
  io::save_file(c.adapter, a);
  return c;
}

TEST(Check, CraftedAdapterProblemsAndCoverage) {
  auto c = crafted();
  auto r = tools::check(c.adapter, c.base);
  const std::string p0 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_";
  const std::string p1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_";
  EXPECT_EQ(r.adapter_format, "kohya");
  EXPECT_EQ(r.base_layout, "diffusers");
  EXPECT_EQ(r.problems(), 3u);

  const auto& q = module(r, p0 + "to_q");
  EXPECT_EQ(q.status, "ok");
  EXPECT_EQ(q.base_key, kTB + "0.attn1.to_q.weight");
  EXPECT_EQ(q.rule, "standalone");
  EXPECT_EQ(q.prefix, "lora_unet");
  EXPECT_EQ(q.algo, "lora");
  EXPECT_EQ(module(r, p0 + "to_out_0").base_key, kTB + "0.attn1.to_out.0.weight");

  const auto& typo = module(r, p0 + "to_qq");
  EXPECT_EQ(typo.status, "unmatched");
  ASSERT_FALSE(typo.closest.empty());
  EXPECT_EQ(typo.closest[0], p0 + "to_q");

  const auto& shape = module(r, p1 + "to_k");
  EXPECT_EQ(shape.status, "shape");
  EXPECT_NE(shape.problems.at(0).find("lora_up"), std::string::npos) << shape.problems.at(0);
  EXPECT_EQ(shape.base_key, kTB + "1.attn1.to_k.weight");

  const auto& nan = module(r, p0 + "to_v");
  EXPECT_EQ(nan.status, "nonfinite");
  EXPECT_NE(nan.problems.at(0).find("lora_down.weight has 1 NaN/Inf"), std::string::npos) << nan.problems.at(0);

  // families attn1.to_q/k/v/to_out.* are covered in block 0: block 1's v and out are reported
  EXPECT_EQ(r.families, (std::vector<std::string>{"attn1.to_k", "attn1.to_out.*", "attn1.to_q", "attn1.to_v"}));
  ASSERT_EQ(r.uncovered.size(), 2u);
  EXPECT_EQ(r.uncovered[0].rfind(kTB + "1.attn1.to_out.0.weight", 0), 0u) << r.uncovered[0];
  EXPECT_EQ(r.uncovered[1].rfind(kTB + "1.attn1.to_v.weight", 0), 0u) << r.uncovered[1];

  // CLI: exit 1, text names the problems; --json parses with the same content
  auto run = run_cli({"check", c.adapter, "--base", c.base});
  EXPECT_EQ(run.code, 1) << run.err;
  EXPECT_NE(run.out.find("UNMATCHED  " + p0 + "to_qq"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("3 module(s) with problems"), std::string::npos) << run.out;
  run = run_cli({"check", c.adapter, "--base", c.base, "--json"});
  EXPECT_EQ(run.code, 1);
  auto j = nlohmann::json::parse(run.out);
  EXPECT_EQ(j["problems"], 3);
  EXPECT_EQ(j["modules"].size(), 7u);
  EXPECT_EQ(j["uncovered"].size(), 2u);
}

TEST(Check, GoldenAdaptersAreCleanWithTheirLoaderNotes) {
  // one note per (loader, rule) that some module meets (the tables of tools/loader_rules.cpp)
  const std::map<std::string, std::string> notes = {
      {"dylora", ""},
      {"lora", "sd-webui (A1111/Forge): LoRA on Conv1d"},
      {"lora_dora", "ComfyUI: DoRA norm"},
      {"lora_dora_wd_in", "PEFT / diffusers: DoRA on the input axis"},
      {"loha_alpha", "LyCORIS (Python reference): merge applies alpha/r twice"},
      {"lokr_tucker", "ComfyUI: LoKr Tucker on Conv2d"},
      {"diag_oft_constraint", "ComfyUI: OFT constraint"},
      {"diag_oft_rescaled", "ComfyUI: Diag-OFT rescale"},
      {"boft", "ComfyUI: BOFT strength"},
      {"ia3", "ComfyUI: no adapter"},
      {"glora", "sd-webui (A1111/Forge): GLoRA layout"},
      {"full", "LyCORIS (Python reference): Full with diff_b"},
      {"norm", "stable-diffusion.cpp: not implemented"},
      {"dylora_conv", "LyCORIS (Python reference): 2-D conv lora_up (DyLoRA)"},
  };
  for (const auto& [c, topic] : notes) {
    SCOPED_TRACE(c);
    auto r = tools::check(test::data_path("golden/" + c + "/adapter.safetensors"),
                          test::data_path("golden/" + c + "/base.safetensors"));
    EXPECT_EQ(r.problems(), 0u) << r.text();
    EXPECT_EQ(r.adapter_format, "lycoris");
    for (const auto& m : r.modules) {
      EXPECT_EQ(m.status, "ok") << m.name;
      EXPECT_EQ(m.rule, "standalone") << m.name;
      // the golden names are "lycoris_" + the base layer's path with . → _
      EXPECT_EQ(naming::module_name("lycoris", m.base_key.substr(0, m.base_key.size() - 7)), m.name);
    }
    std::set<std::string> topics;
    for (const auto& n : r.notes) topics.insert(n.topic);
    if (topic.empty()) EXPECT_TRUE(topics.empty()) << r.text();
    else EXPECT_TRUE(topics.count(topic)) << r.text();
  }
  // every DoRA module is listed under the first note (ComfyUI's DoRA norm)
  auto r = tools::check(test::data_path("golden/lora_dora/adapter.safetensors"),
                        test::data_path("golden/lora_dora/base.safetensors"));
  EXPECT_EQ(r.notes.at(0).modules.size(), r.modules.size());
  auto run = run_cli({"check", test::data_path("golden/lora/adapter.safetensors"), "--base",
                     test::data_path("golden/lora/base.safetensors")});
  EXPECT_EQ(run.code, 0) << run.out << run.err;
  EXPECT_NE(run.out.find("clean"), std::string::npos);
}

// kohya SD1 names and OpenCLIP q/k/v on an original (ldm) checkpoint; a PEFT adapter on a diffusers one.
TEST(Check, LdmBaseAndPeftAdapter) {
  const auto dir = test::temp_dir("check-ldm");
  io::save_file(dir + "/ldm.safetensors",
                {{"model.diffusion_model.input_blocks.1.1.proj_in.weight", torch::zeros({8, 8, 1, 1})},
                 {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", torch::zeros({8, 8})},
                 {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", torch::zeros({24, 8})},
                 {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias", torch::zeros({24})}});
  io::save_file(dir + "/a.safetensors",
                {{"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", torch::ones({1, 8, 1, 1})},
                 {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", torch::ones({8, 1, 1, 1})},
                 {"lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight", torch::ones({1, 8})},
                 {"lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight", torch::ones({8, 1})}});
  auto r = tools::check(dir + "/a.safetensors", dir + "/ldm.safetensors");
  EXPECT_EQ(r.base_layout, "ldm");
  EXPECT_EQ(r.problems(), 0u) << r.text();
  const auto& u = module(r, "lora_unet_down_blocks_0_attentions_0_proj_in");
  EXPECT_EQ(u.base_key, "model.diffusion_model.input_blocks.1.1.proj_in.weight");
  EXPECT_EQ(u.rule, "ldm");
  const auto& v = module(r, "lora_te_text_model_encoder_layers_0_self_attn_v_proj");
  EXPECT_EQ(v.base_key, "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight");
  EXPECT_EQ(v.part, 2);
  EXPECT_EQ(v.parts, 3);
  EXPECT_TRUE(r.uncovered.empty()) << r.text();  // q_proj/k_proj are other families (self_attn.q_proj, …)

  // PEFT naming: resolved under the kohya name of the same path
  io::save_file(dir + "/diffusers.safetensors", {{"unet.conv_in.weight", torch::zeros({8, 4, 3, 3})}});
  io::save_file(dir + "/peft.safetensors", {{"unet.conv_in.lora_A.weight", torch::ones({2, 4, 3, 3})},
                                            {"unet.conv_in.lora_B.weight", torch::ones({8, 2, 1, 1})},
                                            {"unet.conv_out.lora_A.weight", torch::ones({2, 4, 3, 3})},
                                            {"unet.conv_out.lora_B.weight", torch::ones({8, 2, 1, 1})}});
  auto p = tools::check(dir + "/peft.safetensors", dir + "/diffusers.safetensors");
  EXPECT_EQ(p.adapter_format, "peft");
  EXPECT_EQ(module(p, "unet.conv_in").base_key, "unet.conv_in.weight");
  EXPECT_EQ(module(p, "unet.conv_out").status, "unmatched");
  EXPECT_EQ(p.problems(), 1u);
}

TEST(Check, BadInputExitsWithTwo) {
  auto c = crafted();
  auto run = run_cli({"check", c.adapter, "--base", c.dir + "/missing.safetensors"});
  EXPECT_EQ(run.code, 2);
  EXPECT_NE(run.err.find("missing.safetensors"), std::string::npos) << run.err;
  run = run_cli({"check", c.adapter, "--base", c.base, "--base-format", "sgm"});
  EXPECT_EQ(run.code, 2);
  EXPECT_NE(run.err.find("unknown base layout 'sgm'"), std::string::npos) << run.err;
  // (CLI start-up costs ~1 s: the remaining bad inputs through the library, which the CLI maps to exit 2)
  EXPECT_THROW(tools::check(c.adapter, c.base, naming::BaseFormat::Ldm), OptionError);
  std::ofstream(c.dir + "/garbage.safetensors") << "not a safetensors file";
  EXPECT_THROW(tools::check(c.dir + "/garbage.safetensors", c.base), Error);
}

}  // namespace check_test
