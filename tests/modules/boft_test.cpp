// BOFT: butterfly stages of Cayley rotations on the output rows (docs/format.md#boft).
#include "adapter_checks.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/boft.hpp"
#include "lycoris/functional/oft.hpp"
#include "lycoris/modules/boft.hpp"

namespace lycoris {
Algorithm boft_algorithm();
}

namespace boft_test {

using namespace lycoris;

TEST(BOFT, WorkedExample) {
  // docs/format.md#boft: O = 4, S = 2, N = 2, M = 2, B[0,0] = B[1,0] = [[0, 0.5], [0, 0]], W = [1,2,3,4]ᵀ
  auto B = torch::zeros({2, 2, 2, 2});
  B[0][0][0][1] = 0.5;
  B[1][0][0][1] = 0.5;
  auto W = torch::tensor({{1.0}, {2.0}, {3.0}, {4.0}});
  EXPECT_TRUE(test::all_close(functional::boft::apply_weight(W, B, {}, 0, 1.0),
                              torch::tensor({{3.72}, {0.4}, {0.04}, {4.0}}), 1e-6, 0));
  EXPECT_TRUE(test::all_close(functional::boft::diff_weight(W, B, {}, 0, 1.0),
                              torch::tensor({{2.72}, {-1.6}, {-2.96}, {0.0}}), 1e-6, 0));
  // m = 0 → identity; rescale applies regardless of m (docs/loaders.md#q19-rescale-ignores-multiplier)
  EXPECT_TRUE(test::all_close(functional::boft::apply_weight(W, B, {}, 0, 0.0), W, 1e-7, 0));
  auto rs = torch::tensor({{2.0}, {1.0}, {1.0}, {0.5}});
  EXPECT_TRUE(test::all_close(functional::boft::apply_weight(W, B, rs, 0, 0.0), W * rs, 1e-7, 0));
}

TEST(BOFT, EachStageIsOrthogonal) {
  // the whole butterfly is orthogonal: W' = P·W with PᵀP = I
  auto B = torch::randn({3, 4, 4, 4}, torch::kFloat64);
  auto G = functional::boft::matrices(B, 0, 16, 1.0, B);
  auto P = functional::boft::butterfly_rows(torch::eye(16, torch::kFloat64), G);
  EXPECT_TRUE(test::all_close(torch::matmul(P.t(), P), torch::eye(16, torch::kFloat64), 1e-12, 0, "PᵀP = I"));
  // the constraint is honoured over all stages together
  const double c = 0.01;
  auto Q = B - B.transpose(-1, -2);
  auto Qc = Q * (c * 16 / (Q.norm().item<double>() + 1e-8));
  auto I = torch::eye(4, torch::kFloat64);
  EXPECT_TRUE(test::all_close(functional::oft::rotations(B, c, 16, B), torch::matmul(I + Qc, torch::inverse(I - Qc)),
                              1e-12, 0));
}

TEST(BOFT, IdentityAtInitBypassGradRoundTrip) {
  for (bool rescaled : {false, true}) {
    for (double constraint : {0.0, 0.05}) {
      for (const auto& l : test::host_layers()) {
        SCOPED_TRACE(l.describe() + (rescaled ? " rescaled" : "") + " c=" + std::to_string(constraint));
        auto opts = BOFTOptions().algo("boft").rank(2).rescaled(rescaled).constraint(constraint);
        auto a = std::make_shared<BOFTImpl>(l, opts);
        auto W = torch::randn(l.weight_shape());
        EXPECT_TRUE(test::all_close(a->apply_weight(W, 1.0), W, 1e-7, 0));
        test::randomize(*a);
        a->to(torch::kFloat64);
        a->eval();
        test::expect_bypass_equals_rebuild(*a, l, 0.7, l.describe());
        test::expect_bypass_equals_rebuild(*a, l, 1.0, l.describe());
        test::expect_round_trip(*a, boft_algorithm(), l, l.describe());
      }
      for (const auto& l : {test::host_layers()[0], test::host_layers()[2]}) {
        auto a = std::make_shared<BOFTImpl>(l, BOFTOptions().algo("boft").rank(2).rescaled(rescaled).constraint(constraint));
        test::randomize(*a);
        a->eval();
        test::expect_gradients_match(*a, l, 0.7, l.describe());
      }
    }
  }
}

TEST(BOFT, LayoutAndInvalidOptions) {
  // docs/training.md#power2factorization: blocks (log2(N)+1, N, S, S)
  auto shape = [](int64_t O, int64_t rank) {
    return std::make_shared<BOFTImpl>(LayerSpec::linear(4, O), BOFTOptions().rank(rank))->oft_blocks.sizes().vec();
  };
  EXPECT_EQ(shape(16, 2), (std::vector<int64_t>{4, 8, 2, 2}));
  EXPECT_EQ(shape(16, 4), (std::vector<int64_t>{3, 4, 4, 4}));
  EXPECT_EQ(shape(16, 16), (std::vector<int64_t>{1, 1, 16, 16}));
  EXPECT_EQ(shape(16, -1), (std::vector<int64_t>{1, 1, 16, 16}));
  EXPECT_EQ(shape(320, 16), (std::vector<int64_t>{6, 32, 10, 10}));
  // docs/loaders.md#q22-boft-layout: O = 320 needs rank >= 10
  try {
    boft_algorithm().create(LayerSpec::linear(4, 320), BOFTOptions().rank(4));
    FAIL();
  } catch (const OptionError& e) {
    EXPECT_NE(std::string(e.what()).find("320"), std::string::npos) << e.what();
  }
  EXPECT_THROW(boft_algorithm().create(LayerSpec::linear(4, 7), BOFTOptions().rank(4)), OptionError);
}

TEST(BOFT, LoadRejectsMalformed) {
  auto algo = boft_algorithm();
  auto l = LayerSpec::linear(4, 16);
  EXPECT_NO_THROW(algo.load("lycoris_b", {{"oft_blocks", torch::zeros({3, 4, 4, 4})}}, l));
  for (auto bad : {std::vector<int64_t>{2, 4, 4, 4}, {3, 4, 4, 3}, {1, 2, 8, 8}, {3, 4, 2, 2}, {4, 8, 2, 2, 1}}) {
    try {
      algo.load("lycoris_b", {{"oft_blocks", torch::zeros(bad)}}, l);
      FAIL() << "accepted " << bad.size() << "-D blocks";
    } catch (const ShapeError& e) {
      EXPECT_NE(std::string(e.what()).find("lycoris_b.oft_blocks"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(algo.load("lycoris_b", {{"oft_blocks", torch::zeros({3, 4, 4, 4})}, {"rescale", torch::ones({16})}}, l),
               ShapeError);
  EXPECT_THROW(algo.load("lycoris_b", {{"oft_blocks", torch::zeros({3, 4, 4, 4})}, {"hada_w1_a", torch::ones({16})}}, l),
               KeyError);
}

TEST(BOFT, LowPrecisionHostAndModuleDropout) {
  for (const auto& l : test::host_layers()) {
    auto a = std::make_shared<BOFTImpl>(l, BOFTOptions().algo("boft").rank(2).rescaled(true));
    test::randomize(*a);
    test::expect_low_precision_host(*a, l, l.describe());
    test::expect_module_dropout(boft_algorithm(), BOFTOptions().algo("boft").rank(2), l);
  }
}

TEST(BOFT, Golden) {
  for (const char* c : {"boft", "boft_constraint", "boft_rescaled"}) EXPECT_EQ(test::check_golden(c, {boft_algorithm()}), 9) << c;
}

}  // namespace boft_test
