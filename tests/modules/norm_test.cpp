// Norm adapter: w' = w + m·w_norm, b' = b + m·b_norm on LayerNorm / GroupNorm (docs/format.md#norm).
#include "adapter_checks.hpp"
#include "lycoris/error.hpp"
#include "lycoris/modules/norm.hpp"

namespace lycoris {
Algorithm norm_algorithm();
}

namespace norm_test {

using namespace lycoris;

namespace {
std::vector<LayerSpec> norm_layers() { return {LayerSpec::layer_norm(6), LayerSpec::group_norm(2, 6)}; }

torch::Tensor norm_input(const LayerSpec& l) {
  return l.kind == LayerKind::LayerNorm ? torch::randn({2, 3, 6}, torch::kFloat64)
                                        : torch::randn({2, 6, 4, 4}, torch::kFloat64);
}
}  // namespace

TEST(Norm, Formula) {
  auto l = LayerSpec::layer_norm(2);
  auto a = std::make_shared<NormImpl>(l, torch::tensor({1.0, 2.0}), torch::tensor({-1.0, 0.5}));
  EXPECT_TRUE(test::all_close(a->apply_weight(torch::tensor({1.0, 1.0}), 0.5), torch::tensor({1.5, 2.0}), 0, 0));
  EXPECT_TRUE(test::all_close(a->apply_bias(torch::tensor({0.0, 0.0}), 2.0), torch::tensor({-2.0, 1.0}), 0, 0));
  EXPECT_TRUE(test::all_close(a->apply_bias({}, 1.0), torch::tensor({-1.0, 0.5}), 0, 0));
}

TEST(Norm, ZeroAtInitBypassGradRoundTrip) {
  for (const auto& l : norm_layers()) {
    SCOPED_TRACE(l.describe());
    auto a = std::make_shared<NormImpl>(l);
    auto w = torch::randn({l.out_features});
    EXPECT_TRUE(torch::equal(a->apply_weight(w, 1.0), w));
    test::randomize(*a);
    a->to(torch::kFloat64);
    // bypass == rebuild
    auto w64 = torch::randn({l.out_features}, torch::kFloat64), b64 = torch::randn({l.out_features}, torch::kFloat64);
    auto x = norm_input(l);
    {
      torch::NoGradGuard g;
      EXPECT_TRUE(test::all_close(a->bypass_forward(x, w64, b64, 0.7),
                                  layer_forward(x, l, a->apply_weight(w64, 0.7), a->apply_bias(b64, 0.7)), 1e-9, 1e-9));
    }
    test::expect_round_trip(*a, norm_algorithm(), l, l.describe());
    auto ft = a->file_tensors();
    ASSERT_EQ(ft.size(), 2u);
    EXPECT_EQ(ft[0].first, "w_norm");
    EXPECT_EQ(ft[1].first, "b_norm");
    // gradient vs finite differences: loss = sum(norm(x; w', b') ⊙ probe)
    auto probe = torch::randn_like(layer_forward(x, l, w64, b64));
    auto loss = [&] { return (layer_forward(x, l, a->apply_weight(w64, 0.7), a->apply_bias(b64, 0.7)) * probe).sum(); };
    loss().backward();
    for (auto* p : {&a->w_norm, &a->b_norm}) {
      auto grad = p->grad().clone();
      torch::NoGradGuard g;
      auto flat = p->data().view({-1});
      for (int64_t i = 0; i < flat.numel(); ++i) {
        const double v = flat[i].item<double>(), eps = 1e-6;
        flat[i] = v + eps;
        const double up = loss().item<double>();
        flat[i] = v - eps;
        const double down = loss().item<double>();
        flat[i] = v;
        EXPECT_NEAR(grad.view({-1})[i].item<double>(), (up - down) / (2 * eps), 1e-6);
      }
    }
  }
}

TEST(Norm, LoadRejectsMalformed) {
  auto algo = norm_algorithm();
  auto l = LayerSpec::layer_norm(4);
  EXPECT_THROW(algo.load("lycoris_n", {{"w_norm", torch::zeros({5})}}, l), ShapeError);
  EXPECT_THROW(algo.load("lycoris_n", {{"w_norm", torch::zeros({4})}, {"b_norm", torch::zeros({3})}}, l), ShapeError);
  EXPECT_THROW(algo.load("lycoris_n", {{"w_norm", torch::zeros({4})}, {"x", torch::zeros({4})}}, l), KeyError);
  EXPECT_THROW(algo.load("lycoris_n", {{"w_norm", torch::zeros({4})}}, LayerSpec::linear(4, 4)), ShapeError);
  EXPECT_THROW(algo.create(LayerSpec::linear(4, 4), NormOptions()), OptionError);
  EXPECT_TRUE(algo.supports(LayerSpec::group_norm(2, 4)));
  EXPECT_FALSE(algo.supports(LayerSpec::conv(4, 4, {3})));
}

TEST(Norm, ModuleAndChannelDropout) {
  for (const auto& l : norm_layers()) {
    auto a = norm_algorithm().create(l, NormOptions().algo("norm").module_dropout(1.0));
    test::randomize(*a);
    auto w = torch::randn({l.out_features}), b = torch::randn({l.out_features});
    torch::NoGradGuard g;
    a->train();
    EXPECT_TRUE(torch::equal(a->apply_weight(w, 1.0), w));
    EXPECT_TRUE(torch::equal(a->apply_bias(b, 1.0), b));
    a->eval();
    EXPECT_FALSE(torch::allclose(a->apply_weight(w, 1.0), w));
  }
  // rank_dropout drops the same channels of w_norm and b_norm (keep iff u > p), training only
  auto l = LayerSpec::layer_norm(64);
  auto a = std::dynamic_pointer_cast<NormImpl>(norm_algorithm().create(l, NormOptions().algo("norm").rank_dropout(0.5)));
  {
    torch::NoGradGuard g;
    a->w_norm.fill_(1.0);
    a->b_norm.fill_(2.0);
  }
  auto zeros = torch::zeros({64});
  torch::NoGradGuard g;
  a->train();
  auto dw = a->apply_weight(zeros, 1.0), db = a->apply_bias(zeros, 1.0);
  EXPECT_TRUE(torch::equal(dw * 2.0, db));
  const double kept = dw.sum().item<double>();
  EXPECT_GT(kept, 8);
  EXPECT_LT(kept, 56);
  a->eval();
  EXPECT_TRUE(torch::equal(a->apply_weight(zeros, 1.0), torch::ones({64})));
}

TEST(Norm, Golden) { EXPECT_EQ(test::check_golden("norm", {norm_algorithm()}), 3); }

}  // namespace norm_test
