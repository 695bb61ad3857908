// Presets and discovery (docs/training.md#presets): the checked examples of name matching, regex vs fnmatch, exclusions,
// per-module/per-name overrides, built-in presets matched on C++ type names, TOML files and their errors,
// two networks with different presets.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "lycoris/error.hpp"
#include "lycoris/network.hpp"
#include "test_util.hpp"

namespace preset_test {

// blocks.N.attn1.{to_q,to_k} with attn1 of class "Attn" (docs/training.md#discovery checked example), plus
// blocks.N.ff.net.{0,2}, a 3×3 conv_in and a 1×1 proj_out.
struct AttnImpl : torch::nn::Module {
  AttnImpl() {
    register_module("to_q", torch::nn::Linear(8, 8));
    register_module("to_k", torch::nn::Linear(8, 8));
  }
};
TORCH_MODULE(Attn);

struct CrossAttentionImpl : torch::nn::Module {
  CrossAttentionImpl() {
    register_module("to_k", torch::nn::Linear(8, 8));
    register_module("to_v", torch::nn::Linear(8, 8));
  }
};
TORCH_MODULE(CrossAttention);

struct ResnetBlock2DImpl : torch::nn::Module {
  ResnetBlock2DImpl() {
    register_module("norm1", torch::nn::GroupNorm(2, 8));
    register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 8, 3).padding(1)));
  }
};
TORCH_MODULE(ResnetBlock2D);

std::shared_ptr<torch::nn::Module> model(int blocks = 2) {
  auto root = std::make_shared<torch::nn::Module>();
  root->register_module("conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 8, 3).padding(1)));
  auto list = root->register_module("blocks", std::make_shared<torch::nn::Module>());
  for (int i = 0; i < blocks; ++i) {
    auto b = list->register_module(std::to_string(i), std::make_shared<torch::nn::Module>());
    b->register_module("attn1", Attn());
    auto net = b->register_module("ff", std::make_shared<torch::nn::Module>())
                   ->register_module("net", std::make_shared<torch::nn::Module>());
    net->register_module("0", torch::nn::Linear(8, 16));
    net->register_module("2", torch::nn::Linear(16, 8));
  }
  root->register_module("cross", CrossAttention());
  root->register_module("res", ResnetBlock2D());
  root->register_module("proj_out", torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 8, 1)));
  return root;
}

lycoris::LycorisNetwork create(const lycoris::Preset& p, std::shared_ptr<torch::nn::Module> m = model(),
                               lycoris::NetworkOptions o = {}) {
  return lycoris::create_lycoris(std::move(m), 1.0, 4, 1.0, o.preset(p));
}

std::vector<std::string> names(const lycoris::LycorisNetwork& net) {
  std::vector<std::string> out;
  for (const auto& m : net->modules()) out.push_back(m.name);
  return out;
}

const lycoris::NetworkModule& get(const lycoris::LycorisNetwork& net, const std::string& name) {
  const auto* m = net->find(name);
  if (!m) throw std::runtime_error("no module " + name);
  return *m;
}

TEST(PresetMatching, RegexAnchoredAtStartFnmatchWholePath) {
  EXPECT_TRUE(lycoris::name_matches("proj", "proj_out", false));
  EXPECT_TRUE(lycoris::name_matches("blocks.0.ff", "blocks.0.ff.net.2", false));
  EXPECT_FALSE(lycoris::name_matches("ff", "blocks.0.ff", false));
  EXPECT_TRUE(lycoris::name_matches(R"(.*ff\.net\.2$)", "blocks.0.ff.net.2", false));
  EXPECT_FALSE(lycoris::name_matches(R"(.*ff\.net\.2$)", "blocks.0.ff.net.2x", false));
  EXPECT_TRUE(lycoris::name_matches("blocks.*.to_q", "blocks.1.attn1.to_q", true));
  EXPECT_FALSE(lycoris::name_matches("blocks.*.to_q", "blocks.1.attn1.to_q_x", true));
  EXPECT_FALSE(lycoris::name_matches("proj", "proj_out", true));
  EXPECT_TRUE(lycoris::name_matches("blocks.?.attn1.to_[!q]", "blocks.3.attn1.to_k", true));
  EXPECT_THROW(lycoris::name_matches("blocks.(", "blocks", false), lycoris::OptionError);
}

TEST(PresetMatching, TypeNames) {
  EXPECT_EQ(lycoris::module_type_name("torch::nn::LinearImpl"), "Linear");
  EXPECT_EQ(lycoris::module_type_name("preset_test::CrossAttentionImpl"), "CrossAttention");
  EXPECT_EQ(lycoris::module_type_name("a::Foo<b::Bar>"), "Foo<b::Bar>");
  EXPECT_EQ(lycoris::module_type_name("Impl"), "Impl");
  EXPECT_EQ(lycoris::module_type_name(CrossAttention()->name()), "CrossAttention");
}

// docs/training.md#discovery, checked example: a container target ignores exclude_name/name_algo_map (docs/loaders.md#q33-container-exclusions) with
// the compatibility switch; by default they apply; with Linear targets they apply either way.
TEST(PresetDiscovery, CheckedExampleContainerTargets) {
  lycoris::Preset p;
  p.target_module = {"Attn"};
  p.exclude_name = {"blocks.0.attn1.to_k"};
  p.name_algo_map = {{"blocks.1.attn1.to_q", lycoris::ModuleOverride{{"algo", std::string("loha")}, {"dim", int64_t{2}}}}};
  p.container_quirk = true;
  auto quirk = create(p);
  EXPECT_EQ(names(quirk), (std::vector<std::string>{"lycoris_blocks_0_attn1_to_q", "lycoris_blocks_0_attn1_to_k",
                                                    "lycoris_blocks_1_attn1_to_q", "lycoris_blocks_1_attn1_to_k"}));
  for (const auto& m : quirk->modules()) {
    EXPECT_EQ(m.algo, "lora") << m.name;
    EXPECT_EQ(m.adapter->rank(), 4) << m.name;
  }
  p.container_quirk = false;
  auto fixed = create(p);
  EXPECT_EQ(names(fixed), (std::vector<std::string>{"lycoris_blocks_0_attn1_to_q", "lycoris_blocks_1_attn1_to_q",
                                                    "lycoris_blocks_1_attn1_to_k"}));
  EXPECT_EQ(get(fixed, "lycoris_blocks_1_attn1_to_q").algo, "loha");
  EXPECT_EQ(get(fixed, "lycoris_blocks_1_attn1_to_q").adapter->rank(), 2);
}

TEST(PresetDiscovery, CheckedExampleLinearTargets) {
  lycoris::Preset p;
  p.target_module = {"Linear"};
  p.exclude_name = {"blocks.0.attn1.to_k"};
  p.name_algo_map = {{"blocks.1.attn1.to_q", lycoris::ModuleOverride{{"algo", std::string("loha")}, {"dim", int64_t{2}}}}};
  for (bool quirk : {false, true}) {
    p.container_quirk = quirk;
    auto net = create(p);
    EXPECT_EQ(net->find("lycoris_blocks_0_attn1_to_k"), nullptr);
    ASSERT_TRUE(net->find("lycoris_blocks_0_attn1_to_q"));
    EXPECT_EQ(get(net, "lycoris_blocks_1_attn1_to_q").algo, "loha");
    EXPECT_EQ(get(net, "lycoris_blocks_1_attn1_to_q").adapter->rank(), 2);
    EXPECT_EQ(get(net, "lycoris_blocks_1_attn1_to_k").algo, "lora");
    // pre-order: blocks.0 before blocks.1, to_q before to_k, ff after attn1
    auto n = names(net);
    EXPECT_EQ(n.front(), "lycoris_blocks_0_attn1_to_q");
    EXPECT_EQ(n[1], "lycoris_blocks_0_ff_net_0");
  }
}

// docs/training.md#which-rank: which dims a layer gets.
TEST(PresetDiscovery, DimsAndConvRules) {
  auto net = lycoris::create_lycoris(model(), 1.0, 4, 2.0, lycoris::NetworkOptions().conv_dim(2).conv_alpha(1.0));
  EXPECT_EQ(get(net, "lycoris_conv_in").adapter->rank(), 2);       // 3×3: conv dims
  EXPECT_DOUBLE_EQ(get(net, "lycoris_conv_in").adapter->alpha(), 1.0);
  EXPECT_EQ(get(net, "lycoris_proj_out").adapter->rank(), 4);      // 1×1: linear dims
  EXPECT_DOUBLE_EQ(get(net, "lycoris_proj_out").adapter->alpha(), 2.0);
  EXPECT_EQ(net->find("lycoris_res_norm1"), nullptr);               // norms only with train_norm
  // enable_conv = false: no 3×3 convs, 1×1 still adapted
  auto lin = create(lycoris::Preset::builtin("full-lin"));
  EXPECT_EQ(lin->find("lycoris_conv_in"), nullptr);
  EXPECT_EQ(lin->find("lycoris_res_conv1"), nullptr);
  EXPECT_NE(lin->find("lycoris_proj_out"), nullptr);
  // linear_dim 0: no Linear modules; convs (1×1 included) take the conv dims
  auto convs = lycoris::create_lycoris(model(), 1.0, 0, 1.0, lycoris::NetworkOptions().conv_dim(2));
  EXPECT_EQ(names(convs), (std::vector<std::string>{"lycoris_conv_in", "lycoris_res_conv1", "lycoris_proj_out"}));
  EXPECT_EQ(get(convs, "lycoris_proj_out").adapter->rank(), 2);
  // train_norm: Norm adapters
  auto norms = lycoris::create_lycoris(model(), 1.0, 4, 1.0, lycoris::NetworkOptions().train_norm(true));
  EXPECT_EQ(get(norms, "lycoris_res_norm1").algo, "norm");
  // a dim override on a conv with conv dims disabled still creates it (cfg.dim)
  lycoris::Preset p = lycoris::Preset::builtin("full-lin");
  p.name_algo_map = {{"conv_in", lycoris::ModuleOverride{{"dim", int64_t{3}}}}};
  auto over = create(p);
  EXPECT_EQ(get(over, "lycoris_conv_in").adapter->rank(), 3);
}

TEST(PresetBuiltins, MatchedOnCppTypeNames) {
  auto attn = create(lycoris::Preset::builtin("attn-only"));
  EXPECT_EQ(names(attn), (std::vector<std::string>{"lycoris_cross_to_k", "lycoris_cross_to_v"}));
  auto conv = create(lycoris::Preset::builtin("unet-convblock-only"));
  EXPECT_EQ(names(conv), (std::vector<std::string>{"lycoris_conv_in", "lycoris_res_conv1"}));
  auto full = create(lycoris::Preset::builtin("full"));
  EXPECT_EQ(full->modules().size(), 1u + 2u * 4u + 2u + 1u + 1u);
  auto ia3 = lycoris::create_lycoris(model(), 1.0, 4, 1.0,
                                     lycoris::NetworkOptions()
                                         .preset(lycoris::Preset::builtin("ia3"))
                                         .module(lycoris::AdapterOptions().algo("ia3")));
  EXPECT_EQ(names(ia3), (std::vector<std::string>{"lycoris_blocks_0_attn1_to_k", "lycoris_blocks_0_ff_net_2",
                                                  "lycoris_blocks_1_attn1_to_k", "lycoris_blocks_1_ff_net_2",
                                                  "lycoris_cross_to_k", "lycoris_cross_to_v"}));
  for (const auto& m : ia3->modules()) {
    EXPECT_EQ(m.algo, "ia3");
    EXPECT_EQ(m.adapter->options().train_on_input(), m.path.find("ff.net.2") != std::string::npos) << m.name;
  }
  EXPECT_THROW(lycoris::Preset::builtin("nope"), lycoris::OptionError);
  // every built-in creates (the transformer-only ones match nothing in this model: allowed explicitly here)
  for (const auto& n : lycoris::Preset::builtin_names())
    EXPECT_NO_THROW(create(lycoris::Preset::builtin(n), model(), lycoris::NetworkOptions().allow_empty(true))) << n;
}

TEST(PresetToml, FileInTheReferenceSchema) {
  auto p = lycoris::Preset::from_toml_file(lycoris::test::data_path("presets/attn_lokr.toml"));
  EXPECT_FALSE(p.enable_conv);
  EXPECT_EQ(p.target_module, std::vector<std::string>{"Linear"});
  ASSERT_EQ(p.module_algo_map.size(), 1u);
  EXPECT_EQ(p.module_algo_map[0].first, "Attn");
  auto net = create(p);
  // Attn containers: LoKr with full matrices (dim 100000), except the excluded to_k and the name override
  EXPECT_EQ(net->find("lycoris_blocks_0_attn1_to_k"), nullptr);
  EXPECT_EQ(get(net, "lycoris_blocks_0_attn1_to_q").algo, "lokr");
  EXPECT_EQ(get(net, "lycoris_blocks_0_attn1_to_q").adapter->options().factor(), 4);
  EXPECT_EQ(get(net, "lycoris_blocks_1_attn1_to_q").algo, "loha");
  EXPECT_DOUBLE_EQ(get(net, "lycoris_blocks_1_attn1_to_q").adapter->alpha(), 1.5);
  EXPECT_EQ(get(net, "lycoris_blocks_0_ff_net_0").algo, "lora");
  EXPECT_EQ(net->find("lycoris_conv_in"), nullptr);

  auto f = lycoris::Preset::from_toml_file(lycoris::test::data_path("presets/fnmatch.toml"));
  auto fn = create(f);
  EXPECT_EQ(names(fn), (std::vector<std::string>{"lora_unet_blocks_0_attn1_to_q", "lora_unet_blocks_1_attn1_to_q",
                                                 "lora_unet_blocks_1_attn1_to_k", "lora_unet_blocks_1_ff_net_0",
                                                 "lora_unet_blocks_1_ff_net_2"}));
  EXPECT_EQ(get(fn, "lora_unet_blocks_1_ff_net_0").algo, "ia3");
  EXPECT_EQ(get(fn, "lora_unet_blocks_0_attn1_to_q").algo, "lora");
  // resolve: a built-in name or a file
  EXPECT_EQ(lycoris::Preset::resolve("attn-mlp").name, "attn-mlp");
  EXPECT_FALSE(lycoris::Preset::resolve(lycoris::test::data_path("presets/attn_lokr.toml")).enable_conv);
  EXPECT_THROW(lycoris::Preset::resolve("no-such-preset"), lycoris::OptionError);
}

void expect_option_error(const std::string& file, const std::vector<std::string>& needles) {
  try {
    lycoris::Preset::from_toml_file(lycoris::test::data_path("presets/" + file));
    ADD_FAILURE() << file << " accepted";
  } catch (const lycoris::OptionError& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

TEST(PresetToml, ErrorsNameTheFileAndKey) {
  expect_option_error("unknown_key.toml", {"unknown_key.toml", "target_modules", "unknown key"});
  expect_option_error("bad_type.toml", {"bad_type.toml", "target_module", "array"});
  expect_option_error("bad_option.toml", {"bad_option.toml", "linear_dim"});
  expect_option_error("broken.toml", {"broken.toml"});
  expect_option_error("missing.toml", {"missing.toml"});
  EXPECT_THROW(lycoris::Preset::from_toml("[name_algo_map.x]\nalgo = 3\n", "inline"), lycoris::OptionError);
}

TEST(PresetNetworks, TwoNetworksWithDifferentPresetsCoexist) {
  auto m = model();
  auto a = create(lycoris::Preset::builtin("attn-only"), m);
  auto b = create(lycoris::Preset::from_toml_file(lycoris::test::data_path("presets/fnmatch.toml")), m);
  auto a2 = create(lycoris::Preset::builtin("attn-only"), m);
  EXPECT_EQ(names(a), names(a2));  // b's preset did not leak into a2
  auto d = create(lycoris::Preset(), m);
  EXPECT_NE(d->find("lycoris_conv_in"), nullptr);  // nor attn-only's enable_conv = false into the default
  a->apply_to();
  b->apply_to();
  d->apply_to();
  b->restore();
  a->restore();
  d->restore();
}

}  // namespace preset_test
