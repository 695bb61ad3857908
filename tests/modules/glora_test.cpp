// GLoRA: ΔW = s·(W·A + B), A = a1·a2, B = b1·b2, s = alpha / r (docs/format.md#glora).
#include "adapter_checks.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/glora.hpp"
#include "lycoris/modules/glora.hpp"

namespace lycoris {
Algorithm glora_algorithm();
}

namespace glora_test {

using namespace lycoris;

TEST(GLoRA, WorkedExample) {
  // docs/format.md#glora: W = [[1,2],[3,4]], a1 = [[1],[0]], a2 = [[0,1]], b1 = [[1],[1]], b2 = [[2,0]], alpha = 1
  auto W = torch::tensor({{1.0, 2.0}, {3.0, 4.0}});
  functional::glora::Weights w{torch::tensor({{1.0}, {0.0}}), torch::tensor({{0.0, 1.0}}), torch::tensor({{1.0}, {1.0}}),
                               torch::tensor({{2.0, 0.0}})};
  auto expected = torch::tensor({{2.0, 1.0}, {2.0, 3.0}});
  EXPECT_TRUE(test::all_close(functional::glora::diff_weight(W, w, 1.0), expected, 0, 0));
  // through the loader, with an int64 alpha as the reference writes it
  auto a = glora_algorithm().load("lycoris_g",
                                  {{"a1.weight", w.a1}, {"a2.weight", w.a2}, {"b1.weight", w.b1}, {"b2.weight", w.b2},
                                   {"alpha", torch::tensor(int64_t{1})}},
                                  LayerSpec::linear(2, 2));
  EXPECT_TRUE(test::all_close(a->apply_weight(W, 0.5), W + 0.5 * expected, 1e-7, 0));
  // alpha is written back as stored (int64, 0-dim), even after the module changed dtype
  a->to(torch::kFloat64);
  auto alpha = a->file_tensors().front();
  EXPECT_EQ(alpha.first, "alpha");
  EXPECT_EQ(alpha.second.scalar_type(), torch::kInt64);
  EXPECT_EQ(alpha.second.dim(), 0);
  // missing alpha → alpha = r (scale 1)
  auto b = glora_algorithm().load("lycoris_g", {{"a1.weight", w.a1}, {"a2.weight", w.a2}, {"b1.weight", w.b1}, {"b2.weight", w.b2}},
                                  LayerSpec::linear(2, 2));
  EXPECT_EQ(b->alpha(), 1.0);
}

TEST(GLoRA, ZeroAtInitBypassGradRoundTrip) {
  for (bool scalar : {false, true}) {
    for (const auto& l : test::host_layers()) {
      SCOPED_TRACE(l.describe() + (scalar ? " use_scalar" : ""));
      auto opts = GLoRAOptions().algo("glora").rank(2).alpha(1.0).use_scalar(scalar);
      auto a = std::make_shared<GLoRAImpl>(l, opts);
      auto W = torch::randn(l.weight_shape());
      EXPECT_TRUE(torch::equal(a->apply_weight(W, 1.0), W));
      // init: a2, b2 zero unless use_scalar (then Kaiming-uniform and the scalar is 0)
      EXPECT_EQ(a->a2.abs().sum().item<double>() == 0, !scalar);
      EXPECT_EQ(a->b2.abs().sum().item<double>() == 0, !scalar);
      EXPECT_GT(a->a1.abs().sum().item<double>(), 0);
      const double bound = 1.0 / std::sqrt(2.0);  // fan_in of a1 (I, r=2, 1…) is 2
      EXPECT_LE(a->a1.abs().max().item<double>(), bound);
      test::randomize(*a);
      a->to(torch::kFloat64);
      a->eval();
      test::expect_bypass_equals_rebuild(*a, l, 0.7, l.describe());
      test::expect_round_trip(*a, glora_algorithm(), l, l.describe());
      auto ft = a->file_tensors();
      std::vector<std::string> keys;
      for (auto& kv : ft) keys.push_back(kv.first);
      EXPECT_EQ(keys, (std::vector<std::string>{"alpha", "a1.weight", "a2.weight", "b1.weight", "b2.weight"}));
    }
    for (const auto& l : {test::host_layers()[0], test::host_layers()[2]}) {
      auto a = std::make_shared<GLoRAImpl>(l, GLoRAOptions().algo("glora").rank(2).alpha(3.0).use_scalar(scalar));
      test::randomize(*a);
      a->eval();
      test::expect_gradients_match(*a, l, 0.7, l.describe());
    }
  }
}

TEST(GLoRA, ScalarFoldedIntoA2AndB2) {
  auto l = LayerSpec::conv(4, 6, {3, 3});
  auto a = std::make_shared<GLoRAImpl>(l, GLoRAOptions().algo("glora").rank(2).use_scalar(true));
  test::randomize(*a);
  {
    torch::NoGradGuard g;
    a->scalar.fill_(0.37);
  }
  auto ft = a->file_tensors();
  EXPECT_TRUE(test::all_close(ft[2].second, a->a2 * 0.37, 1e-7, 0));
  EXPECT_TRUE(test::all_close(ft[4].second, a->b2 * 0.37, 1e-7, 0));
  test::expect_round_trip(*a, glora_algorithm(), l, "scalar");
}

TEST(GLoRA, RsLoraKeptInFile) {
  // rs_lora trains with alpha/√r; the file's alpha/r must reproduce it
  auto l = LayerSpec::linear(8, 8);
  auto a = std::make_shared<GLoRAImpl>(l, GLoRAOptions().algo("glora").rank(4).alpha(2.0).rs_lora(true));
  EXPECT_NEAR(a->scale(), 2.0 / 2.0, 1e-12);
  EXPECT_NEAR(a->alpha() / 4.0, 1.0, 1e-6);
}

TEST(GLoRA, LoadRejectsMalformed) {
  auto algo = glora_algorithm();
  auto l = LayerSpec::conv(4, 6, {3, 3});
  auto r = 2;
  TensorMap good{{"a1.weight", torch::zeros({4, r, 1, 1})},
                 {"a2.weight", torch::zeros({r, 4, 1, 1})},
                 {"b1.weight", torch::zeros({6, r, 1, 1})},
                 {"b2.weight", torch::zeros({r, 4, 3, 3})},
                 {"alpha", torch::tensor(1.0)}};
  EXPECT_NO_THROW(algo.load("lycoris_g", good, l));
  auto bad = good;
  bad["b2.weight"] = torch::zeros({r, 4, 1, 1});
  try {
    algo.load("lycoris_g", bad, l);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("lycoris_g.b2.weight"), std::string::npos) << e.what();
  }
  bad = good;
  bad["b1.weight"] = torch::zeros({6, 3, 1, 1});  // mismatched rank
  EXPECT_THROW(algo.load("lycoris_g", bad, l), ShapeError);
  bad = good;
  bad.erase("b1.weight");
  EXPECT_THROW(algo.load("lycoris_g", bad, l), KeyError);
  bad = good;
  bad["bm.weight"] = torch::zeros({1});
  EXPECT_THROW(algo.load("lycoris_g", bad, l), KeyError);
  bad = good;
  bad["alpha"] = torch::zeros({2});
  EXPECT_THROW(algo.load("lycoris_g", bad, l), ShapeError);
  EXPECT_THROW(algo.create(LayerSpec::layer_norm(4), GLoRAOptions()), OptionError);
}

TEST(GLoRA, LowPrecisionHostAndModuleDropout) {
  for (const auto& l : test::host_layers()) {
    auto a = std::make_shared<GLoRAImpl>(l, GLoRAOptions().algo("glora").rank(2));
    test::randomize(*a);
    test::expect_low_precision_host(*a, l, l.describe());
    test::expect_module_dropout(glora_algorithm(), GLoRAOptions().algo("glora").rank(2), l);
  }
}

TEST(GLoRA, BypassDropoutsOnlyInTraining) {
  auto l = LayerSpec::linear(6, 8);
  auto a = glora_algorithm().create(l, GLoRAOptions().algo("glora").rank(2).dropout(0.5).rank_dropout(0.5));
  test::randomize(*a);
  a->to(torch::kFloat64);
  auto W = torch::randn(l.weight_shape(), torch::kFloat64);
  auto x = test::input_for(l);
  torch::NoGradGuard g;
  a->eval();
  auto y_eval = a->bypass_forward(x, W, {}, 1.0);
  EXPECT_TRUE(test::all_close(y_eval, layer_forward(x, l, a->apply_weight(W, 1.0), {}), 1e-9, 1e-9));
  a->train();
  torch::manual_seed(3);
  EXPECT_FALSE(torch::allclose(a->bypass_forward(x, W, {}, 1.0), y_eval));
  // no dropout in rebuild mode (docs/training.md#dropout)
  auto w_train = a->apply_weight(W, 1.0);
  a->eval();
  EXPECT_TRUE(torch::equal(w_train, a->apply_weight(W, 1.0)));
}

TEST(GLoRA, Golden) { EXPECT_EQ(test::check_golden("glora", {glora_algorithm()}), 9); }

}  // namespace glora_test
