// `lycoris merge` into OpenCLIP's fused q/k/v projections (SDXL TE2 / SD2 TE in ldm checkpoints:
// `attn.in_proj_weight` (3d, d) and `attn.in_proj_bias` (3d)). A kohya module named after the HF q_proj /
// k_proj / v_proj is that layer, i.e. rows [part·d, (part+1)·d) of the fused weight and bias. Independent
// expected value: the same adapter files merged into a diffusers-layout checkpoint with separate
// q/k/v tensors (holding the same numbers), concatenated — for LoRA, LoHa, LoKr, DoRA (row and column
// norms), Full with a bias delta, multipliers ≠ 1, and two adapters stacked on one fused tensor; plus a
// worked LoRA example by hand and the errors for modules that do not fit the block.
#include <torch/torch.h>

#include <filesystem>

#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/tools/merge.hpp"
#include "test_util.hpp"
#include "tools/merge/merge_tensor.hpp"

namespace merge_fused_test {

using namespace lycoris;
using Tensors = std::vector<std::pair<std::string, torch::Tensor>>;

constexpr int64_t D = 8;  // model width: in_proj_weight is (3D, D)
const std::string kFused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.";
const std::string kSeparate = "text_encoder_2.text_model.encoder.layers.0.self_attn.";
const char* const kParts[] = {"q", "k", "v"};
std::string module(const std::string& part) { return "lora_te2_text_model_encoder_layers_0_self_attn_" + part + "_proj"; }

// The same numbers in both layouts: fused ldm (SDXL TE2) and separate q/k/v (diffusers TE2).
struct Bases {
  std::string dir, fused, separate;
  torch::Tensor W, b;  // (3D, D), (3D)
};

Bases make_bases(const std::string& tag) {
  torch::manual_seed(7);
  Bases t;
  t.dir = test::temp_dir("merge-fused-" + tag);
  t.fused = t.dir + "/fused.safetensors";
  t.separate = t.dir + "/separate.safetensors";
  t.W = torch::randn({3 * D, D});
  t.b = torch::randn({3 * D});
  auto out_w = torch::randn({D, D}), out_b = torch::randn({D});
  io::save_file(t.fused, {{kFused + "in_proj_weight", t.W},
                          {kFused + "in_proj_bias", t.b},
                          {kFused + "out_proj.weight", out_w},
                          {kFused + "out_proj.bias", out_b}});
  Tensors sep;
  for (int p = 0; p < 3; ++p) {
    sep.push_back({kSeparate + kParts[p] + "_proj.weight", t.W.narrow(0, p * D, D).clone()});
    sep.push_back({kSeparate + kParts[p] + "_proj.bias", t.b.narrow(0, p * D, D).clone()});
  }
  sep.push_back({kSeparate + "out_proj.weight", out_w});
  sep.push_back({kSeparate + "out_proj.bias", out_b});
  io::save_file(t.separate, sep);
  return t;
}

std::string save_adapter(const Bases& t, const std::string& name, const Tensors& tensors) {
  const auto path = t.dir + "/" + name + ".safetensors";
  io::save_file(path, tensors);
  return path;
}

// Merges `adapters` into both layouts; the fused output must equal the separate outputs concatenated.
// Returns the fused output's in_proj_weight and in_proj_bias.
std::pair<torch::Tensor, torch::Tensor> expect_fused_equals_separate(const Bases& t,
                                                                     const std::vector<tools::MergeInput>& adapters,
                                                                     size_t modules) {
  tools::MergeOptions o;
  o.adapters = adapters;
  auto rf = tools::merge(t.fused, t.dir + "/out_fused.safetensors", o);
  auto rs = tools::merge(t.separate, t.dir + "/out_separate.safetensors", o);
  size_t applied = 0;
  for (auto n : rf.modules_applied) applied += n;
  EXPECT_EQ(applied, modules);
  EXPECT_EQ(rf.modules_applied, rs.modules_applied);
  EXPECT_TRUE(rf.warnings.empty()) << rf.warnings.front();
  auto f = io::SafetensorsFile::open(t.dir + "/out_fused.safetensors");
  auto s = io::SafetensorsFile::open(t.dir + "/out_separate.safetensors");
  std::vector<torch::Tensor> ws, bs;
  for (const char* p : kParts) {
    ws.push_back(s.tensor(kSeparate + p + "_proj.weight"));
    bs.push_back(s.tensor(kSeparate + p + "_proj.bias"));
  }
  auto W = f.tensor(kFused + "in_proj_weight"), b = f.tensor(kFused + "in_proj_bias");
  EXPECT_TRUE(test::all_close(W, torch::cat(ws), 1e-6, 1e-6, "in_proj_weight"));
  EXPECT_TRUE(test::all_close(b, torch::cat(bs), 1e-6, 1e-6, "in_proj_bias"));
  EXPECT_TRUE(torch::equal(f.tensor(kFused + "out_proj.weight"), s.tensor(kSeparate + "out_proj.weight")));
  return {W, b};
}

TEST(MergeFused, LoRAOnQAndLoHaOnVStackedFromTwoFiles) {
  auto t = make_bases("stacked");
  torch::manual_seed(1);
  auto down = torch::randn({2, D}), up = torch::randn({D, 2});
  const auto lora = save_adapter(t, "lora", {{module("q") + ".lora_down.weight", down},
                                             {module("q") + ".lora_up.weight", up},
                                             {module("q") + ".alpha", torch::tensor(1.0f)}});
  const auto loha = save_adapter(t, "loha", {{module("v") + ".hada_w1_a", torch::randn({D, 2})},
                                             {module("v") + ".hada_w1_b", torch::randn({2, D})},
                                             {module("v") + ".hada_w2_a", torch::randn({D, 2})},
                                             {module("v") + ".hada_w2_b", torch::randn({2, D})},
                                             {module("v") + ".alpha", torch::tensor(4.0f)}});
  auto [W, b] = expect_fused_equals_separate(t, {{lora, 0.7}, {loha, 1.3}}, 2);
  // by hand: q rows = W_q + m·(α/r)·up·down; k rows and every bias row untouched; v rows changed
  EXPECT_TRUE(test::all_close(W.narrow(0, 0, D), t.W.narrow(0, 0, D) + 0.7 * 0.5 * up.mm(down), 1e-6, 1e-6, "q rows"));
  EXPECT_TRUE(torch::equal(W.narrow(0, D, D), t.W.narrow(0, D, D)));
  EXPECT_FALSE(torch::allclose(W.narrow(0, 2 * D, D), t.W.narrow(0, 2 * D, D)));
  EXPECT_TRUE(torch::equal(b, t.b));
}

TEST(MergeFused, LoKrOnK) {
  auto t = make_bases("lokr");
  torch::manual_seed(2);
  const auto a = save_adapter(t, "lokr", {{module("k") + ".lokr_w1", torch::randn({2, 2})},
                                          {module("k") + ".lokr_w2_a", torch::randn({4, 1})},
                                          {module("k") + ".lokr_w2_b", torch::randn({1, 4})},
                                          {module("k") + ".alpha", torch::tensor(1.0f)}});
  auto [W, b] = expect_fused_equals_separate(t, {{a, 0.6}}, 1);
  EXPECT_TRUE(torch::equal(W.narrow(0, 0, D), t.W.narrow(0, 0, D)));
  EXPECT_TRUE(torch::equal(W.narrow(0, 2 * D, D), t.W.narrow(0, 2 * D, D)));
  EXPECT_FALSE(torch::allclose(W.narrow(0, D, D), t.W.narrow(0, D, D)));
}

// DoRA's norms are those of the block (the layer), not of the fused tensor: per output row (LoRA on k)
// and per input column over the block's rows only (LoHa on q, pre-3.2 layout).
TEST(MergeFused, DoRARowAndColumnNorms) {
  auto t = make_bases("dora");
  torch::manual_seed(3);
  const auto a = save_adapter(t, "dora", {{module("k") + ".lora_down.weight", torch::randn({2, D})},
                                          {module("k") + ".lora_up.weight", torch::randn({D, 2})},
                                          {module("k") + ".dora_scale", torch::rand({D, 1}) + 0.5},
                                          {module("q") + ".hada_w1_a", torch::randn({D, 2})},
                                          {module("q") + ".hada_w1_b", torch::randn({2, D})},
                                          {module("q") + ".hada_w2_a", torch::randn({D, 2})},
                                          {module("q") + ".hada_w2_b", torch::randn({2, D})},
                                          {module("q") + ".dora_scale", torch::rand({1, D}) + 0.5}});
  auto [W, b] = expect_fused_equals_separate(t, {{a, 0.8}}, 2);
  EXPECT_FALSE(torch::allclose(W.narrow(0, 0, 2 * D), t.W.narrow(0, 0, 2 * D)));
  EXPECT_TRUE(torch::equal(W.narrow(0, 2 * D, D), t.W.narrow(0, 2 * D, D)));
}

// Full with diff_b: the bias delta goes to the same rows of in_proj_bias.
TEST(MergeFused, FullWithBiasDeltaOnV) {
  auto t = make_bases("full");
  torch::manual_seed(4);
  auto diff = torch::randn({D, D}), diff_b = torch::randn({D});
  const auto a = save_adapter(t, "full", {{module("v") + ".diff", diff}, {module("v") + ".diff_b", diff_b}});
  auto [W, b] = expect_fused_equals_separate(t, {{a, 0.5}}, 1);
  EXPECT_TRUE(test::all_close(W.narrow(0, 2 * D, D), t.W.narrow(0, 2 * D, D) + 0.5 * diff, 1e-6, 1e-6, "v rows"));
  EXPECT_TRUE(test::all_close(b.narrow(0, 2 * D, D), t.b.narrow(0, 2 * D, D) + 0.5 * diff_b, 1e-6, 1e-6, "v bias"));
  EXPECT_TRUE(torch::equal(b.narrow(0, 0, 2 * D), t.b.narrow(0, 0, 2 * D)));
  EXPECT_TRUE(torch::equal(W.narrow(0, 0, 2 * D), t.W.narrow(0, 0, 2 * D)));
}

// A module that does not fit its block, or a fused bias of the wrong length: an error naming the adapter
// file, the module and the key (output untouched); --allow-unmatched skips that module only.
TEST(MergeFused, ModulesThatDoNotFitTheBlock) {
  auto t = make_bases("errors");
  const auto good = Tensors{{module("q") + ".lora_down.weight", torch::ones({1, D})},
                            {module("q") + ".lora_up.weight", torch::ones({D, 1})}};
  auto wrong = good;  // k: up with the fused tensor's row count instead of the block's
  wrong.push_back({module("k") + ".lora_down.weight", torch::ones({1, D})});
  wrong.push_back({module("k") + ".lora_up.weight", torch::ones({3 * D, 1})});
  const auto a = save_adapter(t, "wrong", wrong);
  const auto out = t.dir + "/out.safetensors";
  tools::MergeOptions o;
  o.adapters = {{a, 1.0}};
  try {
    tools::merge(t.fused, out, o);
    ADD_FAILURE() << "a module with the fused tensor's shape merged";
  } catch (const Error& e) {
    const std::string what = e.what();
    for (const auto& s : {a, module("k"), kFused + "in_proj_weight"}) EXPECT_NE(what.find(s), std::string::npos) << what;
  }
  EXPECT_FALSE(std::filesystem::exists(out));
  o.allow_unmatched = true;
  auto r = tools::merge(t.fused, out, o);
  EXPECT_EQ(r.modules_applied.at(0), 1u);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find(module("k")), std::string::npos) << r.warnings[0];
  auto W = io::SafetensorsFile::open(out).tensor(kFused + "in_proj_weight");
  EXPECT_TRUE(test::all_close(W.narrow(0, 0, D), t.W.narrow(0, 0, D) + 1, 1e-6, 1e-6, "q rows"));
  EXPECT_TRUE(torch::equal(W.narrow(0, D, 2 * D), t.W.narrow(0, D, 2 * D)));

  // in_proj_bias not of length 3D: the row block of the bias is undefined
  const auto bad_base = t.dir + "/bad_bias.safetensors";
  io::save_file(bad_base, {{kFused + "in_proj_weight", t.W}, {kFused + "in_proj_bias", torch::zeros({2 * D})}});
  const auto q = save_adapter(t, "q", good);
  o.adapters = {{q, 1.0}};
  o.allow_unmatched = false;
  try {
    tools::merge(bad_base, out, o);
    ADD_FAILURE() << "merged into a fused bias of the wrong length";
  } catch (const ShapeError& e) {
    const std::string what = e.what();
    for (const auto& s : {q, module("q"), kFused + "in_proj_bias"}) EXPECT_NE(what.find(s), std::string::npos) << what;
  }
  o.allow_unmatched = true;
  r = tools::merge(bad_base, out, o);
  EXPECT_EQ(r.modules_applied.at(0), 0u);
  EXPECT_EQ(r.warnings.size(), 1u);
  EXPECT_TRUE(torch::equal(io::SafetensorsFile::open(out).tensor(kFused + "in_proj_weight"), t.W));
}

// merge_tensor itself: a step's rows must lie in the tensor.
TEST(MergeFused, MergeTensorChecksTheRowRange) {
  torch::NoGradGuard no_grad;
  auto t = make_bases("range");
  const auto a = save_adapter(t, "full", {{module("v") + ".diff", torch::ones({D, D})}});
  auto loaded = load_adapter_for_base(a, t.fused);
  ASSERT_EQ(loaded.modules.size(), 1u);
  auto* m = loaded.modules[0].adapter.get();
  auto x = torch::zeros({3 * D, D});
  tools::MergeStep s{m, 2.0, false, D, 2 * D};
  EXPECT_TRUE(tools::merge_tensor(x, x, {s}));
  EXPECT_TRUE(torch::equal(x.narrow(0, D, D), torch::full({D, D}, 2.0)));
  EXPECT_EQ(x.sum().item<double>(), 2.0 * D * D);
  s.row_begin = 2 * D + 1;
  s.row_end = 3 * D + 1;
  EXPECT_THROW(tools::merge_tensor(x, x, {s}), ShapeError);
}

}  // namespace merge_fused_test
