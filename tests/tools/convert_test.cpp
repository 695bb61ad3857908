// `lycoris convert`: lycoris → kohya → peft → lycoris keeps every golden adapter's ΔW (checked against the
// golden merged_m1 files, i.e. the reference's values); PEFT names, folded alphas and DoRA magnitudes;
// PEFT alphas read from adapter_config.json (worked example); kohya SDXL (SGM) names become diffusers
// paths; refusals; merging a converted adapter into an ldm-named base equals merging it into the
// diffusers-named base; CLI errors.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"
#include "lycoris/tools/convert.hpp"
#include "lycoris/tools/merge.hpp"
#include "test_util.hpp"

namespace convert_test {

using namespace lycoris;
namespace fs = std::filesystem;
using tools::AdapterFormat;
using lycoris::test::run_cli;

// Newline characters in a text (one-line messages end with one).
size_t lines(const std::string& s) { return static_cast<size_t>(std::count(s.begin(), s.end(), '\n')); }

tools::ConvertReport convert_to(const std::string& in, const std::string& out, AdapterFormat to,
                                const std::string& base = "") {
  tools::ConvertOptions o;
  o.to = to;
  o.base = base;
  return tools::convert(in, out, o);
}

// base weight key → W' = apply_weight(W, 1) (and bias key → b') for every module of `adapter`.
std::map<std::string, torch::Tensor> merged(const std::string& adapter, const std::string& base_path) {
  torch::NoGradGuard no_grad;
  auto base = io::SafetensorsFile::open(base_path);
  auto loaded = load_adapter_for_base(adapter, base_path);
  std::map<std::string, torch::Tensor> out;
  for (const auto& m : loaded.modules) {
    const auto& l = m.target.layer;
    out[l.weight_key] = m.adapter->apply_weight(base.tensor(l.weight_key, torch::kFloat32), 1.0);
    if (!l.bias_key.empty()) out[l.bias_key] = m.adapter->apply_bias(base.tensor(l.bias_key, torch::kFloat32), 1.0);
  }
  return out;
}

// Every touched tensor equals the golden expected merge (manifest tolerance).
void expect_matches_golden(const std::string& adapter, const std::string& c, size_t modules) {
  const auto dir = test::data_path("golden/" + c);
  std::ifstream in(dir + "/../manifest.json");
  auto man = nlohmann::json::parse(in);
  double atol = 1e-5, rtol = 1e-4;
  for (const auto& k : man["cases"])
    if (k["name"] == c) {
      atol = k["tolerance"]["weights"]["atol"];
      rtol = k["tolerance"]["weights"]["rtol"];
    }
  auto expected = io::SafetensorsFile::open(dir + "/merged_m1.safetensors");
  auto got = merged(adapter, dir + "/base.safetensors");
  EXPECT_EQ(load_adapter_for_base(adapter, dir + "/base.safetensors").modules.size(), modules);
  for (const auto& [key, t] : got)
    EXPECT_TRUE(test::all_close(t, expected.tensor(key, torch::kFloat32), atol, rtol, c + " " + key));
}

const std::vector<std::string>& peft_cases() {
  static const std::vector<std::string> cases = {"lora",  "lora_dora", "lora_rs",  "lora_scalar_fp16", "loha",
                                                 "loha_alpha", "loha_tucker", "lokr", "lokr_alpha", "lokr_f4",
                                                 "lokr_f8", "lokr_both", "lokr_full", "lokr_tucker", "dylora",
                                                 "dylora_conv"};
  return cases;
}

TEST(Convert, GoldenRoundTripThroughKohyaAndPeftKeepsDeltaW) {
  const auto dir = test::temp_dir("convert-golden");
  for (const auto& c : peft_cases()) {
    SCOPED_TRACE(c);
    const auto src = test::data_path("golden/" + c + "/adapter.safetensors");
    const auto base = test::data_path("golden/" + c + "/base.safetensors");
    const size_t n = load_adapter_for_base(src, base).modules.size();
    const auto k = dir + "/" + c + ".kohya.safetensors", p = dir + "/" + c + ".peft.safetensors",
               l = dir + "/" + c + ".lycoris.safetensors";
    EXPECT_EQ(convert_to(src, k, AdapterFormat::Kohya).from, AdapterFormat::Lycoris);
    auto rp = convert_to(k, p, AdapterFormat::Peft, base);
    EXPECT_EQ(rp.from, AdapterFormat::Kohya);
    EXPECT_EQ(rp.guessed_paths, 0u);
    EXPECT_EQ(convert_to(p, l, AdapterFormat::Lycoris).from, AdapterFormat::Peft);
    for (const auto& name : io::SafetensorsFile::open(k).names()) EXPECT_EQ(name.rfind("lora_unet_", 0), 0u) << name;
    for (const auto& name : io::SafetensorsFile::open(p).names()) {
      EXPECT_EQ(name.rfind("unet.", 0), 0u) << name;
      EXPECT_EQ(name.find(".alpha"), std::string::npos) << name;  // folded
    }
    for (const auto& name : io::SafetensorsFile::open(l).names()) EXPECT_EQ(name.rfind("lycoris_", 0), 0u) << name;
    expect_matches_golden(k, c, n);
    expect_matches_golden(l, c, n);
  }
}

// Algorithms PEFT cannot express still go through the LyCORIS/kohya namings unchanged, and PEFT refuses them.
TEST(Convert, NonPeftAlgorithmsRoundTripKohyaAndAreRefusedByPeft) {
  const auto dir = test::temp_dir("convert-refuse");
  for (const std::string c : {"lora_tucker", "lora_dora_wd_in", "ia3", "ia3_input", "full", "full_nobias", "norm",
                              "glora", "diag_oft", "diag_oft_rescaled", "boft", "boft_constraint"}) {
    SCOPED_TRACE(c);
    const auto src = test::data_path("golden/" + c + "/adapter.safetensors");
    const auto base = test::data_path("golden/" + c + "/base.safetensors");
    const size_t n = load_adapter_for_base(src, base).modules.size();
    const auto k = dir + "/" + c + ".kohya.safetensors", l = dir + "/" + c + ".lycoris.safetensors";
    convert_to(src, k, AdapterFormat::Kohya);
    convert_to(k, l, AdapterFormat::Lycoris);
    expect_matches_golden(l, c, n);
    const auto p = dir + "/" + c + ".peft.safetensors";
    try {
      convert_to(src, p, AdapterFormat::Peft);
      ADD_FAILURE() << "PEFT accepted " << c;
    } catch (const OptionError& e) {
      EXPECT_NE(std::string(e.what()).find("cannot be expressed in peft"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("lycoris_"), std::string::npos) << e.what();  // names the module
    }
    EXPECT_FALSE(fs::exists(p));
  }
}

TEST(Convert, PeftTensorNamesFoldedAlphaAndDoraMagnitude) {
  const auto dir = test::temp_dir("convert-peft");
  // lora: alpha 2, rank 4 (linear), alpha 1, rank 2 (conv) → lora_B = up·alpha/r; no alpha keys
  const auto src = test::data_path("golden/lora/adapter.safetensors");
  auto r = convert_to(src, dir + "/p.safetensors", AdapterFormat::Peft);  // no base: paths guessed, exactly
  EXPECT_EQ(r.guessed_paths, 9u);
  EXPECT_EQ(r.folded, 9u);
  auto in = io::SafetensorsFile::open(src);
  auto p = io::SafetensorsFile::open(dir + "/p.safetensors");
  EXPECT_EQ(p.tensors().size(), 18u);
  EXPECT_TRUE(torch::equal(p.tensor("base_model.model.blocks.0.attn.to_out.0.lora_A.weight"),
                           in.tensor("lycoris_blocks_0_attn_to_out_0.lora_down.weight")));
  EXPECT_TRUE(test::all_close(p.tensor("base_model.model.blocks.0.attn.to_out.0.lora_B.weight"),
                              in.tensor("lycoris_blocks_0_attn_to_out_0.lora_up.weight") * 0.5, 0, 0));
  EXPECT_TRUE(test::all_close(p.tensor("base_model.model.temporal.conv.lora_B.weight"),
                              in.tensor("lycoris_temporal_conv.lora_up.weight") * 0.5, 0, 0));
  EXPECT_TRUE(p.contains("base_model.model.down.0.skip.lora_A.weight"));

  // DoRA: PEFT magnitude (O,) for Linear, (1, O, 1, 1) for conv (peft/tuners/lora/dora.py)
  convert_to(test::data_path("golden/lora_dora/adapter.safetensors"), dir + "/d.safetensors", AdapterFormat::Peft);
  auto d = io::SafetensorsFile::open(dir + "/d.safetensors");
  EXPECT_EQ(d.info("base_model.model.blocks.0.attn.to_q.lora_magnitude_vector").shape, (std::vector<int64_t>{16}));
  EXPECT_EQ(d.info("base_model.model.down.0.conv1.lora_magnitude_vector").shape, (std::vector<int64_t>{1, 16, 1, 1}));
  EXPECT_EQ(d.info("base_model.model.temporal.conv.lora_magnitude_vector").shape, (std::vector<int64_t>{1, 8, 1}));
}

// PEFT keeps alpha in adapter_config.json: scale = lora_alpha / r (alpha_pattern per module), / sqrt(r) with rs-LoRA.
TEST(Convert, PeftAlphasFromAdapterConfig) {
  const auto dir = test::temp_dir("convert-peft-config");
  auto A = torch::tensor({{1.f, 0.f, 2.f, 0.f}, {0.f, 1.f, 0.f, -1.f}});  // (r=2, in=4)
  auto B = torch::tensor({{1.f, 2.f}, {0.f, 1.f}, {3.f, 0.f}});           // (out=3, r=2)
  io::save_file(dir + "/adapter_model.safetensors", {{"base_model.model.lin.lora_A.weight", A},
                                                     {"base_model.model.lin.lora_B.weight", B},
                                                     {"base_model.model.other.lora_A.weight", A},
                                                     {"base_model.model.other.lora_B.weight", B}});
  std::ofstream(dir + "/adapter_config.json") << R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {"other": 1}})";
  io::save_file(dir + "/base.safetensors", {{"lin.weight", torch::zeros({3, 4})}, {"other.weight", torch::zeros({3, 4})}});
  convert_to(dir + "/adapter_model.safetensors", dir + "/l.safetensors", AdapterFormat::Lycoris);
  auto l = io::SafetensorsFile::open(dir + "/l.safetensors");
  EXPECT_FLOAT_EQ(l.tensor("lycoris_lin.alpha").item<float>(), 4.f);    // s = 4/2 = 2 = alpha/r → alpha 4
  EXPECT_FLOAT_EQ(l.tensor("lycoris_other.alpha").item<float>(), 1.f);  // s = 1/2
  auto got = merged(dir + "/l.safetensors", dir + "/base.safetensors");
  // B·A = [[1,2,2,-2],[0,1,0,-1],[3,0,6,0]]
  auto BA = torch::tensor({{1.f, 2.f, 2.f, -2.f}, {0.f, 1.f, 0.f, -1.f}, {3.f, 0.f, 6.f, 0.f}});
  EXPECT_TRUE(test::all_close(got.at("lin.weight"), 2 * BA, 1e-6, 0));
  EXPECT_TRUE(test::all_close(got.at("other.weight"), 0.5 * BA, 1e-6, 0));

  // rs-LoRA: scale = lora_alpha / sqrt(r) = 3 / sqrt(2)
  std::ofstream(dir + "/adapter_config.json") << R"({"r": 2, "lora_alpha": 3, "use_rslora": true})";
  convert_to(dir + "/adapter_model.safetensors", dir + "/rs.safetensors", AdapterFormat::Kohya);
  auto rs = merged(dir + "/rs.safetensors", dir + "/base.safetensors");
  EXPECT_TRUE(test::all_close(rs.at("lin.weight"), 3 / std::sqrt(2.0) * BA, 1e-5, 1e-6));
}

// kohya SDXL names are SGM paths; PEFT/diffusers U-Net names are diffusers paths.
TEST(Convert, SgmNamesBecomeDiffusersPathsInPeft) {
  const auto dir = test::temp_dir("convert-sgm");
  auto down = torch::ones({2, 8}), up = torch::ones({8, 2});
  io::save_file(dir + "/k.safetensors", {{"lora_unet_input_blocks_4_1_proj_in.lora_down.weight", down},
                                         {"lora_unet_input_blocks_4_1_proj_in.lora_up.weight", up},
                                         {"lora_unet_output_blocks_0_1_proj_out.lora_down.weight", down},
                                         {"lora_unet_output_blocks_0_1_proj_out.lora_up.weight", up},
                                         {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", down},
                                         {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", up}});
  convert_to(dir + "/k.safetensors", dir + "/p.safetensors", AdapterFormat::Peft);
  auto p = io::SafetensorsFile::open(dir + "/p.safetensors");
  EXPECT_TRUE(p.contains("unet.down_blocks.1.attentions.0.proj_in.lora_A.weight"));
  EXPECT_TRUE(p.contains("unet.up_blocks.0.attentions.0.proj_out.lora_B.weight"));
  EXPECT_TRUE(p.contains("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"));
  // and back to kohya: diffusers-path names (which ComfyUI and our merge also resolve on SDXL checkpoints)
  convert_to(dir + "/p.safetensors", dir + "/k2.safetensors", AdapterFormat::Kohya);
  auto k2 = io::SafetensorsFile::open(dir + "/k2.safetensors");
  EXPECT_TRUE(k2.contains("lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight"));
  EXPECT_TRUE(k2.contains("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"));
}

// Small SD1-shaped checkpoint in both layouts: the same tensors under diffusers and ldm keys.
struct TwoLayouts {
  std::string dir, diffusers, ldm;
  std::map<std::string, std::string> to_ldm;  // diffusers key → ldm key
};

TwoLayouts two_layouts() {
  TwoLayouts t;
  t.dir = test::temp_dir("convert-layouts");
  t.diffusers = t.dir + "/diffusers.safetensors";
  t.ldm = t.dir + "/ldm.safetensors";
  const std::vector<std::pair<std::string, std::vector<int64_t>>> layers = {
      {"conv_in", {8, 4, 3, 3}},
      {"down_blocks.0.attentions.0.proj_in", {8, 8, 1, 1}},
      {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", {8, 8}},
      {"down_blocks.1.resnets.0.conv1", {8, 8, 3, 3}},
      {"down_blocks.1.resnets.0.time_emb_proj", {8, 16}},
      {"mid_block.attentions.0.transformer_blocks.0.attn2.to_k", {8, 12}},
      {"mid_block.resnets.1.conv2", {8, 8, 3, 3}},
      {"up_blocks.0.upsamplers.0.conv", {8, 8, 3, 3}},
      {"up_blocks.3.attentions.2.proj_out", {8, 8, 1, 1}},
  };
  torch::manual_seed(3);
  std::vector<std::pair<std::string, torch::Tensor>> d, l;
  for (const auto& [path, shape] : layers) {
    const auto ldm = "model.diffusion_model." + *naming::sd_unet_table().to_ldm(path);
    auto w = torch::randn(shape), b = torch::randn({shape[0]});
    d.emplace_back(path + ".weight", w);
    l.emplace_back(ldm + ".weight", w);
    t.to_ldm[path + ".weight"] = ldm + ".weight";
    if (path.find("to_") == std::string::npos) {
      d.emplace_back(path + ".bias", b);
      l.emplace_back(ldm + ".bias", b);
      t.to_ldm[path + ".bias"] = ldm + ".bias";
    }
  }
  const std::string te = "text_model.encoder.layers.0.self_attn.q_proj.weight";
  auto q = torch::randn({8, 8});
  d.emplace_back(te, q);
  l.emplace_back("cond_stage_model.transformer." + te, q);
  t.to_ldm[te] = "cond_stage_model.transformer." + te;
  io::save_file(t.diffusers, d);
  io::save_file(t.ldm, l);
  // a kohya LoCon on every layer (rank 2, alpha 1: scale 0.5)
  std::vector<std::pair<std::string, torch::Tensor>> a;
  for (const auto& [path, shape] : layers) {
    const auto name = naming::module_name("lora_unet", path);
    std::vector<int64_t> down = shape, up = {shape[0], 2};
    down[0] = 2;
    for (size_t i = 2; i < shape.size(); ++i) up.push_back(1);
    a.emplace_back(name + ".lora_down.weight", torch::randn(down));
    a.emplace_back(name + ".lora_up.weight", torch::randn(up));
    a.emplace_back(name + ".alpha", torch::tensor(1.f));
  }
  a.emplace_back("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", torch::randn({2, 8}));
  a.emplace_back("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", torch::randn({8, 2}));
  a.emplace_back("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha", torch::tensor(1.f));
  io::save_file(t.dir + "/kohya.safetensors", a);
  return t;
}

TEST(Convert, MergeOfConvertedAdapterIntoLdmBaseEqualsDiffusersBase) {
  auto t = two_layouts();
  const auto src = t.dir + "/kohya.safetensors", p = t.dir + "/p.safetensors", k = t.dir + "/k.safetensors";
  convert_to(src, p, AdapterFormat::Peft);  // guessed paths: exact for SD names
  convert_to(p, k, AdapterFormat::Kohya);
  tools::MergeOptions o;
  o.adapters = {{k, 1.0}};
  tools::merge(t.diffusers, t.dir + "/m_diffusers.safetensors", o);
  o.base_format = naming::BaseFormat::Ldm;
  auto report = tools::merge(t.ldm, t.dir + "/m_ldm.safetensors", o);
  EXPECT_EQ(report.modules_applied.at(0), 10u);
  tools::MergeOptions orig;
  orig.adapters = {{src, 1.0}};
  tools::merge(t.diffusers, t.dir + "/m_orig.safetensors", orig);
  auto md = io::SafetensorsFile::open(t.dir + "/m_diffusers.safetensors");
  auto ml = io::SafetensorsFile::open(t.dir + "/m_ldm.safetensors");
  auto mo = io::SafetensorsFile::open(t.dir + "/m_orig.safetensors");
  auto base = io::SafetensorsFile::open(t.diffusers);
  size_t changed = 0;
  for (const auto& [dk, lk] : t.to_ldm) {
    EXPECT_TRUE(test::all_close(ml.tensor(lk), md.tensor(dk), 0, 0, lk));
    EXPECT_TRUE(test::all_close(md.tensor(dk), mo.tensor(dk), 1e-6, 1e-6, dk));
    changed += torch::equal(md.tensor(dk), base.tensor(dk)) ? 0 : 1;
  }
  EXPECT_EQ(changed, 10u);  // every weight changed, biases untouched

  // the CLI detects the layout by itself, and refuses a forced layout the keys contradict
  auto r = run_cli({"merge", t.ldm, k, "-o", t.dir + "/m_cli.safetensors", "-q"});
  EXPECT_EQ(r.code, 0) << r.err;
  auto mc = io::SafetensorsFile::open(t.dir + "/m_cli.safetensors");
  for (const auto& [dk, lk] : t.to_ldm) EXPECT_TRUE(torch::equal(mc.tensor(lk), ml.tensor(lk))) << lk;
  r = run_cli({"merge", t.diffusers, k, "-o", t.dir + "/bad.safetensors", "--base-format", "ldm"});
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  EXPECT_NE(r.err.find("ldm"), std::string::npos) << r.err;
  r = run_cli({"merge", t.diffusers, k, "-o", t.dir + "/bad.safetensors", "--base-format", "sgm"});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("unknown base layout 'sgm'"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(t.dir + "/bad.safetensors"));
}

// OpenCLIP's fused q/k/v (SD2 ldm: kohya lora_te_ names): the k_proj module merges into rows 8–16 of
// in_proj_weight (worked example: ΔW = up·down = 1 everywhere). More in merge_fused_test.
TEST(Convert, MergeIntoFusedOpenClipProjections) {
  const auto dir = test::temp_dir("convert-fused");
  io::save_file(dir + "/base.safetensors",
                {{"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", torch::zeros({24, 8})},
                 {"cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight", torch::zeros({16, 8})}});
  io::save_file(dir + "/a.safetensors",
                {{"lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight", torch::ones({1, 8})},
                 {"lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight", torch::ones({8, 1})},
                 {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", torch::ones({1, 8})},
                 {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", torch::ones({16, 1})}});
  tools::MergeOptions o;
  o.adapters = {{dir + "/a.safetensors", 1.0}};
  auto r = tools::merge(dir + "/base.safetensors", dir + "/out.safetensors", o);
  EXPECT_EQ(r.modules_applied.at(0), 2u);
  EXPECT_TRUE(r.warnings.empty());
  auto out = io::SafetensorsFile::open(dir + "/out.safetensors");
  auto expected = torch::zeros({24, 8});
  expected.narrow(0, 8, 8).fill_(1);
  EXPECT_TRUE(torch::equal(out.tensor("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"), expected));
  EXPECT_TRUE(torch::equal(out.tensor("cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight"), torch::ones({16, 8})));
}

TEST(Convert, CliUsageAndErrors) {
  const auto dir = test::temp_dir("convert-cli-errors");
  const auto src = test::data_path("golden/loha_alpha/adapter.safetensors");
  auto r = run_cli({"convert", src, "--to", "peft", "-o", dir + "/p.safetensors"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("from lycoris to peft"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("guessed"), std::string::npos) << r.err;  // no --base: says the paths are guessed
  r = run_cli({"convert", src, "--to", "onnx", "-o", dir + "/x.safetensors"});
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  EXPECT_NE(r.err.find("unknown adapter format 'onnx'"), std::string::npos) << r.err;
  r = run_cli({"convert", test::data_path("golden/ia3/adapter.safetensors"), "--to", "peft", "-o", dir + "/x.safetensors"});
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  EXPECT_NE(r.err.find("ia3"), std::string::npos) << r.err;
  // (CLI start-up costs ~1 s: the remaining bad inputs through the library; the CLI turns errors into exit 1)
  tools::ConvertOptions o;
  o.to = AdapterFormat::Peft;
  o.base = test::data_path("golden/lora/base.safetensors");
  o.base_format = naming::BaseFormat::Ldm;
  EXPECT_THROW(tools::convert(src, dir + "/x.safetensors", o), OptionError);
  EXPECT_THROW(convert_to(dir + "/missing.safetensors", dir + "/x.safetensors", AdapterFormat::Kohya), IOError);
  EXPECT_FALSE(fs::exists(dir + "/x.safetensors"));
  // a kohya name that matches nothing in --base
  io::save_file(dir + "/odd.safetensors", {{"lora_unet_nowhere.lora_down.weight", torch::ones({1, 2})},
                                           {"lora_unet_nowhere.lora_up.weight", torch::ones({2, 1})}});
  EXPECT_THROW(convert_to(dir + "/odd.safetensors", dir + "/x.safetensors", AdapterFormat::Peft,
                          test::data_path("golden/lora/base.safetensors")),
               KeyError);
  // a key PEFT has no place for (sd-webui's "scale") is refused, not dropped; kohya keeps it
  io::save_file(dir + "/scale.safetensors", {{"lora_unet_x.lora_down.weight", torch::ones({1, 2})},
                                             {"lora_unet_x.lora_up.weight", torch::ones({2, 1})},
                                             {"lora_unet_x.scale", torch::tensor(0.5f)}});
  try {
    convert_to(dir + "/scale.safetensors", dir + "/x.safetensors", AdapterFormat::Peft);
    ADD_FAILURE() << "scale key dropped";
  } catch (const OptionError& e) {
    EXPECT_NE(std::string(e.what()).find("lora_unet_x: key 'scale' has no PEFT equivalent"), std::string::npos) << e.what();
  }
  convert_to(dir + "/scale.safetensors", dir + "/k.safetensors", AdapterFormat::Lycoris);
  EXPECT_TRUE(io::SafetensorsFile::open(dir + "/k.safetensors").contains("lycoris_x.scale"));
}

}  // namespace convert_test
