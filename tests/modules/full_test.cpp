// Full adapter: W' = W + m·diff, b' = b + m·diff_b (docs/format.md#full).
#include "adapter_checks.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/full.hpp"
#include "lycoris/modules/full.hpp"

namespace lycoris {
Algorithm full_algorithm();
}

namespace full_test {

using namespace lycoris;

TEST(Full, FormulaAndBiasCreation) {
  auto l = LayerSpec::linear(2, 2, false);
  auto a = std::make_shared<FullImpl>(l, torch::tensor({{1.0, 2.0}, {3.0, 4.0}}), torch::tensor({0.5, -1.0}));
  auto W = torch::tensor({{1.0, 0.0}, {0.0, 1.0}});
  EXPECT_TRUE(test::all_close(a->apply_weight(W, 0.5), torch::tensor({{1.5, 1.0}, {1.5, 3.0}}), 0, 0));
  // host without bias: the bias is created from diff_b
  EXPECT_TRUE(test::all_close(a->apply_bias({}, 2.0), torch::tensor({1.0, -2.0}), 0, 0));
  EXPECT_TRUE(test::all_close(a->apply_bias(torch::tensor({1.0, 1.0}), 1.0), torch::tensor({1.5, 0.0}), 0, 0));
}

TEST(Full, ZeroAtInitBypassGradRoundTrip) {
  for (const auto& l : test::host_layers()) {
    SCOPED_TRACE(l.describe());
    auto a = std::make_shared<FullImpl>(l);
    auto W = torch::randn(l.weight_shape());
    EXPECT_TRUE(torch::equal(a->apply_weight(W, 1.0), W));
    EXPECT_TRUE(torch::equal(a->apply_bias(torch::ones({l.out_features}), 1.0), torch::ones({l.out_features})));
    test::randomize(*a);
    a->to(torch::kFloat64);
    test::expect_bypass_equals_rebuild(*a, l, 0.7, l.describe());
    test::expect_round_trip(*a, full_algorithm(), l, l.describe());
  }
  for (const auto& l : {test::host_layers()[0], test::host_layers()[2]}) {
    auto a = std::make_shared<FullImpl>(l);
    test::randomize(*a);
    test::expect_gradients_match(*a, l, 0.7, l.describe());
  }
}

TEST(Full, LoadRejectsMalformed) {
  auto algo = full_algorithm();
  auto l = LayerSpec::linear(4, 3);
  try {
    algo.load("lycoris_x", {{"diff", torch::zeros({3, 5})}}, l);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("lycoris_x.diff"), std::string::npos) << e.what();
  }
  try {
    algo.load("lycoris_x", {{"diff", torch::zeros({3, 4})}, {"bogus", torch::zeros({1})}}, l);
    FAIL();
  } catch (const KeyError& e) {
    EXPECT_NE(std::string(e.what()).find("bogus"), std::string::npos) << e.what();
  }
  EXPECT_THROW(algo.load("lycoris_x", {{"diff", torch::zeros({3, 4})}, {"diff_b", torch::zeros({4})}}, l), ShapeError);
  EXPECT_THROW(algo.create(LayerSpec::layer_norm(4), FullOptions()), OptionError);
  EXPECT_THROW(algo.create(LayerSpec::conv(4, 4, {3}, {}, {}, {}, 2), FullOptions()), OptionError);
}

TEST(Full, LowPrecisionHostAndModuleDropout) {
  for (const auto& l : test::host_layers()) {
    auto a = std::make_shared<FullImpl>(l);
    test::randomize(*a);
    test::expect_low_precision_host(*a, l, l.describe());
    test::expect_module_dropout(full_algorithm(), FullOptions().algo("full"), l);
  }
}

TEST(Full, Golden) {
  EXPECT_EQ(test::check_golden("full", {full_algorithm()}), 9);
  EXPECT_EQ(test::check_golden("full_nobias", {full_algorithm()}), 9);
}

}  // namespace full_test
