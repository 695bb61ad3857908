// (IA)^3: W' = W ⊙ (1 + m·v) along the output rows or (on_input) the input columns; bias untouched.
#include "adapter_checks.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/ia3.hpp"
#include "lycoris/modules/ia3.hpp"

namespace lycoris {
Algorithm ia3_algorithm();
}

namespace ia3_test {

using namespace lycoris;

TEST(IA3, FormulaBothAxes) {
  auto l = LayerSpec::linear(2, 2);
  auto W = torch::tensor({{1.0, 2.0}, {3.0, 4.0}});
  auto out = std::make_shared<IA3Impl>(l, torch::tensor({1.0, -0.5}), false);
  EXPECT_TRUE(test::all_close(out->apply_weight(W, 1.0), torch::tensor({{2.0, 4.0}, {1.5, 2.0}}), 0, 0));
  EXPECT_TRUE(test::all_close(out->apply_weight(W, 0.5), torch::tensor({{1.5, 3.0}, {2.25, 3.0}}), 0, 0));
  auto in = std::make_shared<IA3Impl>(l, torch::tensor({1.0, -0.5}), true);
  EXPECT_TRUE(test::all_close(in->apply_weight(W, 1.0), torch::tensor({{2.0, 1.0}, {6.0, 2.0}}), 0, 0));
  // ΔW = m·W ⊙ v
  EXPECT_TRUE(test::all_close(functional::ia3::diff_weight(W, torch::tensor({1.0, -0.5}), true, 1.0),
                              torch::tensor({{1.0, -1.0}, {3.0, -2.0}}), 0, 0));
  // the bias is never scaled, in rebuild and in bypass
  auto b = torch::tensor({10.0, 20.0});
  EXPECT_TRUE(torch::equal(out->apply_bias(b, 1.0), b));
  auto x = torch::zeros({1, 2});
  EXPECT_TRUE(test::all_close(out->bypass_forward(x, W, b, 1.0), b.unsqueeze(0), 0, 0));
}

TEST(IA3, IdentityAtInitBypassGradRoundTrip) {
  for (bool on_input : {false, true}) {
    for (const auto& l : test::host_layers()) {
      SCOPED_TRACE(l.describe() + (on_input ? " on_input" : " on_output"));
      auto a = std::make_shared<IA3Impl>(l, IA3Options().algo("ia3").train_on_input(on_input));
      auto W = torch::randn(l.weight_shape());
      EXPECT_TRUE(torch::equal(a->apply_weight(W, 1.0), W));
      EXPECT_EQ(a->weight.sizes().vec(), functional::ia3::vector_shape(l, on_input));
      test::randomize(*a);
      a->to(torch::kFloat64);
      test::expect_bypass_equals_rebuild(*a, l, 0.7, l.describe());
      test::expect_round_trip(*a, ia3_algorithm(), l, l.describe());
      {
        // ΔW·x without ΔW equals the layer op with ΔW = m·W ⊙ v
        torch::NoGradGuard g;
        auto W64 = torch::randn(l.weight_shape(), torch::kFloat64);
        auto x = test::input_for(l);
        EXPECT_TRUE(test::all_close(functional::ia3::bypass_diff(x, l, W64, a->weight, on_input, 0.7),
                                    layer_forward(x, l, functional::ia3::diff_weight(W64, a->weight, on_input, 0.7), {}),
                                    1e-10, 1e-9, "bypass_diff"));
      }
      auto ft = a->file_tensors();
      ASSERT_EQ(ft.size(), 2u);
      EXPECT_EQ(ft[0].first, "weight");
      EXPECT_EQ(ft[1].first, "on_input");
      EXPECT_EQ(ft[1].second.scalar_type(), torch::kInt64);
      EXPECT_EQ(ft[1].second.dim(), 0);
      EXPECT_EQ(ft[1].second.item<int64_t>(), on_input ? 1 : 0);
    }
    for (const auto& l : {test::host_layers()[0], test::host_layers()[2]}) {
      auto a = std::make_shared<IA3Impl>(l, IA3Options().algo("ia3").train_on_input(on_input));
      test::randomize(*a);
      test::expect_gradients_match(*a, l, 0.7, l.describe());
    }
  }
}

TEST(IA3, LoadRejectsMalformed) {
  auto algo = ia3_algorithm();
  auto l = LayerSpec::linear(4, 3);
  auto flag = [](int64_t v) { return torch::tensor(v, torch::kInt64); };
  // (4,) is the input axis: wrong for on_input = 0
  try {
    algo.load("lycoris_x", {{"weight", torch::zeros({4})}, {"on_input", flag(0)}}, l);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("lycoris_x.weight"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(algo.load("lycoris_x", {{"weight", torch::zeros({4})}, {"on_input", flag(1)}}, l));
  EXPECT_THROW(algo.load("lycoris_x", {{"weight", torch::zeros({4})}, {"on_input", flag(2)}}, l), ShapeError);
  EXPECT_THROW(algo.load("lycoris_x", {{"on_input", flag(0)}}, l), KeyError);
  EXPECT_THROW(algo.load("lycoris_x", {{"weight", torch::zeros({3})}, {"on_input", flag(0)}, {"alpha", flag(1)}}, l),
               KeyError);
  // conv vectors are stored (1, C, 1, …)
  auto c = LayerSpec::conv(4, 6, {3, 3});
  EXPECT_THROW(algo.load("lycoris_x", {{"weight", torch::zeros({6})}, {"on_input", flag(0)}}, c), ShapeError);
  EXPECT_NO_THROW(algo.load("lycoris_x", {{"weight", torch::zeros({1, 6, 1, 1})}, {"on_input", flag(0)}}, c));
}

TEST(IA3, LowPrecisionHostAndModuleDropout) {
  for (const auto& l : test::host_layers()) {
    auto a = std::make_shared<IA3Impl>(l, IA3Options().algo("ia3"));
    test::randomize(*a);
    test::expect_low_precision_host(*a, l, l.describe());
    test::expect_module_dropout(ia3_algorithm(), IA3Options().algo("ia3").train_on_input(true), l);
  }
}

TEST(IA3, Golden) {
  EXPECT_EQ(test::check_golden("ia3", {ia3_algorithm()}), 9);
  EXPECT_EQ(test::check_golden("ia3_input", {ia3_algorithm()}), 9);
}

}  // namespace ia3_test
