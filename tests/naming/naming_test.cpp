// Naming dialects: the diffusers ↔ ldm U-Net table on every layer of the SD1.5 layer list (and back), the
// worked examples of docs/tools.md#checkpoint-layouts, OpenCLIP ↔ HF with the fused q/k/v rows, kohya / SGM / ldm names
// resolved through the Resolver (every known prefix; colliding paths resolved by shape at load), layout
// detection and its errors, and the underscore → dot guess.
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"
#include "test_util.hpp"

namespace naming_test {

using namespace lycoris::naming;
using lycoris::OptionError;
using lycoris::ShapeError;

std::vector<std::string> sd15_modules() {
  std::ifstream in(lycoris::test::data_path("sd15_unet_layers.json"));
  auto j = nlohmann::json::parse(in);
  std::vector<std::string> out;
  for (const auto& l : j["layers"]) out.push_back(l["module"].get<std::string>());
  return out;
}

// ldm keys of the SD1.5 U-Net built from the table (plus a bias for each), and the diffusers module → key.
std::vector<std::string> ldm_keys(const std::vector<std::string>& modules) {
  std::vector<std::string> keys;
  for (const auto& m : modules) {
    const auto l = sd_unet_table().to_ldm(m);
    keys.push_back("model.diffusion_model." + *l + ".weight");
    keys.push_back("model.diffusion_model." + *l + ".bias");
  }
  return keys;
}

TEST(NamingTable, Sd15EveryLayerMapsAndRoundTrips) {
  const auto modules = sd15_modules();
  ASSERT_EQ(modules.size(), 391u);  // the list's layer count (docs/tools.md#performance)
  std::set<std::string> ldm, blocks;
  for (const auto& m : modules) {
    auto l = sd_unet_table().to_ldm(m);
    ASSERT_TRUE(l.has_value()) << m;
    EXPECT_EQ(sd_unet_table().to_diffusers(*l), m) << *l;
    ldm.insert(*l);
    // the block a key lives in: "input_blocks.N", "middle_block.N", "output_blocks.N" or a top-level layer
    const auto first = l->substr(0, l->find('.'));
    const auto rest = l->substr(first.size() + 1);
    blocks.insert(first == "input_blocks" || first == "middle_block" || first == "output_blocks"
                      ? first + "." + rest.substr(0, rest.find('.'))
                      : first);
  }
  EXPECT_EQ(ldm.size(), modules.size()) << "two diffusers layers share an ldm path";
  // SD1.x original layout: input_blocks 0–11, middle_block 0–2, output_blocks 0–11, time_embed, out
  std::set<std::string> expected = {"time_embed", "out"};
  for (int i = 0; i < 12; ++i) {
    expected.insert("input_blocks." + std::to_string(i));
    expected.insert("output_blocks." + std::to_string(i));
  }
  for (int i = 0; i < 3; ++i) expected.insert("middle_block." + std::to_string(i));
  EXPECT_EQ(blocks, expected);
}

// docs/tools.md#checkpoint-layouts: the table and its checked examples.
TEST(NamingTable, WorkedExamples) {
  const auto& sd = sd_unet_table();
  const auto& xl = sdxl_unet_table();
  EXPECT_EQ(sd.to_ldm("down_blocks.1.resnets.0.time_emb_proj"), "input_blocks.4.0.emb_layers.1");
  EXPECT_EQ(xl.to_ldm("down_blocks.1.resnets.0.time_emb_proj"), "input_blocks.4.0.emb_layers.1");
  EXPECT_EQ(sd.to_ldm("mid_block.resnets.1.conv2"), "middle_block.2.out_layers.3");
  EXPECT_EQ(xl.to_ldm("up_blocks.1.upsamplers.0.conv"), "output_blocks.5.2.conv");
  EXPECT_EQ(sd.to_ldm("up_blocks.1.upsamplers.0.conv"), "output_blocks.5.2.conv");
  // SD1 level 0 of the up path has no attention: the upsampler is the block's second entry
  EXPECT_EQ(sd.to_ldm("up_blocks.0.upsamplers.0.conv"), "output_blocks.2.1.conv");
  EXPECT_EQ(xl.to_ldm("up_blocks.0.upsamplers.0.conv"), "output_blocks.2.2.conv");
  EXPECT_EQ(sd.to_ldm("conv_in"), "input_blocks.0.0");
  EXPECT_EQ(sd.to_ldm("time_embedding.linear_1"), "time_embed.0");
  EXPECT_EQ(sd.to_ldm("time_embedding.linear_2"), "time_embed.2");
  EXPECT_EQ(sd.to_ldm("conv_norm_out"), "out.0");
  EXPECT_EQ(sd.to_ldm("conv_out"), "out.2");
  EXPECT_EQ(sd.to_ldm("down_blocks.0.downsamplers.0.conv"), "input_blocks.3.0.op");
  EXPECT_EQ(sd.to_ldm("down_blocks.2.downsamplers.0.conv"), "input_blocks.9.0.op");
  EXPECT_EQ(sd.to_ldm("down_blocks.3.resnets.1.conv1"), "input_blocks.11.0.in_layers.2");
  EXPECT_EQ(sd.to_ldm("down_blocks.1.resnets.0.conv_shortcut"), "input_blocks.4.0.skip_connection");
  EXPECT_EQ(sd.to_ldm("mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
            "middle_block.1.transformer_blocks.0.attn2.to_k");
  EXPECT_EQ(sd.to_ldm("up_blocks.3.attentions.2.proj_out"), "output_blocks.11.1.proj_out");
  EXPECT_EQ(sd.to_ldm("up_blocks.2.resnets.2.norm1"), "output_blocks.8.0.in_layers.0");
  EXPECT_EQ(xl.to_ldm("add_embedding.linear_2"), "label_emb.0.2");
  EXPECT_EQ(xl.to_ldm("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"),
            "input_blocks.8.1.transformer_blocks.9.ff.net.2");
  EXPECT_FALSE(sd.to_ldm("add_embedding.linear_1").has_value());  // SD1 has no class embedding
  EXPECT_FALSE(sd.to_ldm("down_blocks.3.attentions.0.proj_in").has_value());  // level 3 has no attention
  EXPECT_FALSE(xl.to_ldm("down_blocks.0.attentions.0.proj_in").has_value());  // SDXL level 0 neither
  EXPECT_FALSE(sd.to_ldm("down_blocks.0.resnets.0.nonsense").has_value());
  EXPECT_EQ(sd.to_diffusers("input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q");
  EXPECT_EQ(xl.to_diffusers("output_blocks.0.1.proj_in"), "up_blocks.0.attentions.0.proj_in");
  EXPECT_FALSE(sd.to_diffusers("output_blocks.0.1.proj_in").has_value());
}

TEST(NamingResolver, KohyaAndSgmNamesOnAnLdmCheckpoint) {
  const auto modules = sd15_modules();
  auto keys = ldm_keys(modules);
  Resolver r(keys);
  for (const auto& m : modules) {
    const auto expect = "model.diffusion_model." + *sd_unet_table().to_ldm(m) + ".weight";
    for (const std::string& name : {module_name("lora_unet", m), module_name("lycoris", m)}) {
      auto hits = r.find(name);
      ASSERT_EQ(hits.size(), 1u) << name;
      EXPECT_EQ(hits[0]->layer.weight_key, expect);
      EXPECT_EQ(hits[0]->layer.bias_key, "model.diffusion_model." + *sd_unet_table().to_ldm(m) + ".bias");
      EXPECT_EQ(hits[0]->dialect, "ldm");
      EXPECT_EQ(hits[0]->path, m);
    }
  }
  auto sgm = r.find("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q");
  ASSERT_EQ(sgm.size(), 1u);
  EXPECT_EQ(sgm[0]->layer.weight_key, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight");
  EXPECT_EQ(sgm[0]->dialect, "ldm-sgm");
  EXPECT_EQ(detect_base_format(keys), BaseFormat::Ldm);
}

TEST(NamingResolver, SgmNamesOnADiffusersCheckpoint) {
  std::vector<std::string> keys;
  for (const auto& m : sd15_modules()) keys.push_back(m + ".weight");
  Resolver r(keys);
  auto hits = r.find("lora_unet_output_blocks_11_1_proj_out");
  ASSERT_EQ(hits.size(), 1u);
  EXPECT_EQ(hits[0]->layer.weight_key, "up_blocks.3.attentions.2.proj_out.weight");
  EXPECT_EQ(hits[0]->dialect, "sgm");
  EXPECT_EQ(r.find("lora_unet_up_blocks_3_attentions_2_proj_out").at(0)->dialect, "standalone");
  EXPECT_EQ(detect_base_format(keys), BaseFormat::Diffusers);
  // diffusers pipeline files with component prefixes
  Resolver p({"unet.conv_in.weight", "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight",
              "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.weight"});
  EXPECT_EQ(p.find("lora_unet_conv_in").at(0)->layer.weight_key, "unet.conv_in.weight");
  EXPECT_EQ(p.find("lora_te1_text_model_encoder_layers_0_mlp_fc1").at(0)->layer.weight_key,
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight");
  EXPECT_EQ(p.find("lora_te2_text_model_encoder_layers_0_mlp_fc1").at(0)->layer.weight_key,
            "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.weight");
}

TEST(NamingResolver, TextEncodersOfTheOriginalLayouts) {
  const std::vector<std::string> keys = {
      // SD1: HF CLIP under cond_stage_model.transformer (with and without the text_model level)
      "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
      "cond_stage_model.transformer.encoder.layers.3.self_attn.q_proj.weight",
      // SD2: OpenCLIP
      "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
      "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias",
      "cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight",
      "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
      "cond_stage_model.model.transformer.resblocks.0.ln_2.weight",
      "cond_stage_model.model.ln_final.weight",
  };
  Resolver r(keys);
  EXPECT_EQ(r.find("lora_te_text_model_encoder_layers_11_mlp_fc2").at(0)->layer.weight_key, keys[0]);
  EXPECT_EQ(r.find("lora_te_text_model_encoder_layers_3_self_attn_q_proj").at(0)->layer.weight_key, keys[1]);
  for (int i = 0; i < 3; ++i) {
    const char* proj[] = {"q_proj", "k_proj", "v_proj"};
    auto hits = r.find(std::string("lora_te_text_model_encoder_layers_0_self_attn_") + proj[i]);
    ASSERT_EQ(hits.size(), 1u) << proj[i];
    EXPECT_EQ(hits[0]->layer.weight_key, keys[2]);
    EXPECT_EQ(hits[0]->layer.bias_key, keys[3]);
    EXPECT_EQ(hits[0]->layer.part, i);
    EXPECT_EQ(hits[0]->layer.parts, 3);
    EXPECT_EQ(layer_shape(hits[0]->layer, {3072, 1024}), (std::vector<int64_t>{1024, 1024}));
    EXPECT_THROW(layer_shape(hits[0]->layer, {1000, 1024}), ShapeError);
  }
  EXPECT_EQ(r.find("lora_te_text_model_encoder_layers_0_self_attn_out_proj").at(0)->layer.weight_key, keys[4]);
  EXPECT_EQ(r.find("lora_te_text_model_encoder_layers_0_mlp_fc1").at(0)->layer.weight_key, keys[5]);
  EXPECT_EQ(r.find("lora_te_text_model_encoder_layers_0_layer_norm2").at(0)->layer.weight_key, keys[6]);
  EXPECT_EQ(r.find("lora_te_text_model_final_layer_norm").at(0)->layer.weight_key, keys[7]);

  // SDXL: TE1 HF under conditioner.embedders.0.transformer, TE2 OpenCLIP under conditioner.embedders.1.model
  Resolver x({"conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
              "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"});
  EXPECT_EQ(x.find("lora_te1_text_model_encoder_layers_3_mlp_fc1").size(), 1u);
  auto v = x.find("lora_te2_text_model_encoder_layers_5_self_attn_v_proj");
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0]->layer.part, 2);
  EXPECT_EQ(v[0]->dialect, "ldm-openclip");

  // HF → OpenCLIP is the inverse
  EXPECT_EQ(hf_to_openclip("text_model.encoder.layers.7.self_attn.k_proj"),
            std::make_pair(std::string("transformer.resblocks.7.attn.in_proj"), 1));
  EXPECT_EQ(hf_to_openclip("text_model.encoder.layers.7.mlp.fc2"),
            std::make_pair(std::string("transformer.resblocks.7.mlp.c_proj"), -1));
  EXPECT_EQ(openclip_to_hf("transformer.resblocks.7.mlp.c_proj"),
            std::vector<std::string>{"text_model.encoder.layers.7.mlp.fc2"});
  EXPECT_TRUE(openclip_to_hf("transformer.resblocks.x.mlp.c_proj").empty());
}

TEST(NamingResolver, LayoutOptionAndErrors) {
  EXPECT_EQ(parse_base_format("auto"), BaseFormat::Auto);
  EXPECT_EQ(parse_base_format("ldm"), BaseFormat::Ldm);
  EXPECT_EQ(parse_base_format("diffusers"), BaseFormat::Diffusers);
  EXPECT_THROW(parse_base_format("sgm"), OptionError);
  const std::vector<std::string> diffusers = {"conv_in.weight"}, ldm = {"model.diffusion_model.input_blocks.0.0.weight"};
  EXPECT_THROW(Resolver(diffusers, BaseFormat::Ldm), OptionError);
  EXPECT_THROW(Resolver(ldm, BaseFormat::Diffusers), OptionError);
  // forced layouts keep only their dialects
  Resolver l(ldm, BaseFormat::Ldm);
  EXPECT_EQ(l.find("lora_unet_conv_in").at(0)->dialect, "ldm");
  Resolver d(diffusers, BaseFormat::Diffusers);
  EXPECT_EQ(d.find("lora_unet_conv_in").at(0)->dialect, "standalone");
  EXPECT_EQ(d.find("lora_unet_input_blocks_0_0").at(0)->dialect, "sgm");
}

TEST(NamingGuess, UnderscoreToDot) {
  for (const auto& m : sd15_modules()) EXPECT_EQ(guess_path(module_name("x", m).substr(2)), m);
  for (const auto& m : sd15_modules()) {
    const auto l = *sd_unet_table().to_ldm(m);
    EXPECT_EQ(guess_path(module_name("x", l).substr(2)), l);
  }
  EXPECT_EQ(guess_path("text_model_encoder_layers_11_self_attn_q_proj"), "text_model.encoder.layers.11.self_attn.q_proj");
  EXPECT_EQ(guess_path("text_model_final_layer_norm"), "text_model.final_layer_norm");
  EXPECT_EQ(guess_path("blocks_0_attn_to_out_0"), "blocks.0.attn.to_out.0");
  EXPECT_EQ(guess_path("temporal_conv"), "temporal.conv");
}

// Names resolve through the base's layers with any known prefix; colliding paths are resolved by shape.
TEST(Naming, ResolvesEveryPrefixAndCollidingPaths) {
  Resolver r({"a.b_c.weight", "a_b.c.weight", "a_b.c.bias", "conv_in.weight", "weight", "x.y"});
  auto hits = r.find("lycoris_a_b_c");
  ASSERT_EQ(hits.size(), 2u);
  EXPECT_EQ(r.find("lora_unet_conv_in").at(0)->layer.weight_key, "conv_in.weight");
  EXPECT_EQ(r.find("lora_te2_conv_in").at(0)->prefix, "lora_te2");
  EXPECT_EQ(r.find("lycoris_").at(0)->layer.weight_key, "weight");
  EXPECT_TRUE(r.find("lycoris_x").empty());
  EXPECT_TRUE(r.find("lycoris_conv_out").empty());
  EXPECT_EQ(r.closest("lycoris_conv_inn", 1).at(0), "lycoris_conv_in");
  for (const auto* h : hits)
    EXPECT_EQ(h->layer.bias_key, h->layer.path == "a_b.c" ? "a_b.c.bias" : "");

  // the loader keeps the candidate the module fits
  const std::string dir = lycoris::test::temp_dir("naming-collide");
  lycoris::io::save_file(dir + "/base.safetensors",
                         {{"a.b_c.weight", torch::zeros({4, 3})}, {"a_b.c.weight", torch::zeros({5, 3})}});
  lycoris::io::save_file(dir + "/ad.safetensors", {{"lycoris_a_b_c.lora_up.weight", torch::ones({5, 1})},
                                                   {"lycoris_a_b_c.lora_down.weight", torch::ones({1, 3})}});
  auto loaded = lycoris::load_adapter_for_base(dir + "/ad.safetensors", dir + "/base.safetensors");
  ASSERT_EQ(loaded.modules.size(), 1u);
  EXPECT_EQ(loaded.modules[0].target.layer.weight_key, "a_b.c.weight");
}

}  // namespace naming_test
