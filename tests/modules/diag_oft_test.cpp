// Diag-OFT: W'_n = M_nᵀ·W_n, M = m·R + (1 − m)·I, R = Cayley(B − Bᵀ) (docs/format.md#diag-oft).
#include "adapter_checks.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/diag_oft.hpp"
#include "lycoris/functional/oft.hpp"
#include "lycoris/modules/diag_oft.hpp"

namespace lycoris {
Algorithm diag_oft_algorithm();
}

namespace diag_oft_test {

using namespace lycoris;

TEST(DiagOFT, WorkedExample) {
  // docs/format.md#diag-oft: B = [[0, 0.5], [0, 0]] → R = [[0.6, 0.8], [−0.8, 0.6]]
  auto B = torch::tensor({{{0.0, 0.5}, {0.0, 0.0}}});
  auto W = torch::eye(2);
  auto R = functional::oft::rotations(B, 0, 2, W);
  EXPECT_TRUE(test::all_close(R[0], torch::tensor({{0.6, 0.8}, {-0.8, 0.6}}), 1e-6, 0));
  EXPECT_TRUE(test::all_close(functional::diag_oft::apply_weight(W, B, {}, 0, 1.0),
                              torch::tensor({{0.6, -0.8}, {0.8, 0.6}}), 1e-6, 0));
  EXPECT_TRUE(test::all_close(functional::diag_oft::apply_weight(W, B, {}, 0, 0.5),
                              torch::tensor({{0.8, -0.4}, {0.4, 0.8}}), 1e-6, 0));
  // rescale is not interpolated by m
  auto rs = torch::tensor({{2.0}, {3.0}});
  EXPECT_TRUE(test::all_close(functional::diag_oft::apply_weight(W, B, rs, 0, 0.0), torch::tensor({{2.0, 0.0}, {0.0, 3.0}}),
                              1e-6, 0));
}

TEST(DiagOFT, OrthogonalAndConstraint) {
  auto B = torch::randn({4, 3, 3}, torch::kFloat64);
  auto R = functional::oft::rotations(B, 0, 12, B);
  auto RtR = torch::matmul(R.transpose(-1, -2), R);
  EXPECT_TRUE(test::all_close(RtR, torch::eye(3, torch::kFloat64).expand({4, 3, 3}), 1e-12, 0, "RᵀR = I"));
  // constraint c: the joint norm of Q is clipped to c·O
  const double c = 0.01, O = 12;
  auto Q = B - B.transpose(-1, -2);
  ASSERT_GT(Q.norm().item<double>(), c * O);
  auto Qc = Q * (c * O / (Q.norm().item<double>() + 1e-8));
  auto I = torch::eye(3, torch::kFloat64);
  auto expected = torch::matmul(I + Qc, torch::inverse(I - Qc));
  EXPECT_TRUE(test::all_close(functional::oft::rotations(B, c, 12, B), expected, 1e-12, 0, "constrained"));
  // below the bound nothing changes
  EXPECT_TRUE(test::all_close(functional::oft::rotations(B * 1e-4, 100.0, 12, B), functional::oft::rotations(B * 1e-4, 0, 12, B),
                              0, 0));
}

TEST(DiagOFT, IdentityAtInitBypassGradRoundTrip) {
  for (bool rescaled : {false, true}) {
    for (double constraint : {0.0, 0.05}) {
      for (const auto& l : test::host_layers()) {
        SCOPED_TRACE(l.describe() + (rescaled ? " rescaled" : "") + " c=" + std::to_string(constraint));
        auto opts = DiagOFTOptions().algo("diag-oft").rank(2).rescaled(rescaled).constraint(constraint);
        auto a = std::make_shared<DiagOFTImpl>(l, opts);
        EXPECT_EQ(a->oft_blocks.sizes().vec(), (std::vector<int64_t>{l.out_features / 2, 2, 2}));
        auto W = torch::randn(l.weight_shape());
        EXPECT_TRUE(test::all_close(a->apply_weight(W, 1.0), W, 1e-7, 0));
        test::randomize(*a);
        a->to(torch::kFloat64);
        a->eval();
        test::expect_bypass_equals_rebuild(*a, l, 0.7, l.describe());
        test::expect_round_trip(*a, diag_oft_algorithm(), l, l.describe());
        auto ft = a->file_tensors();
        EXPECT_EQ(ft.front().first, "oft_blocks");
        EXPECT_EQ(ft.back().first, "alpha");
        EXPECT_EQ(ft.size(), rescaled ? 3u : 2u);
      }
      for (const auto& l : {test::host_layers()[0], test::host_layers()[2]}) {
        auto a = std::make_shared<DiagOFTImpl>(
            l, DiagOFTOptions().algo("diag-oft").rank(4).rescaled(rescaled).constraint(constraint));
        test::randomize(*a);
        a->eval();
        test::expect_gradients_match(*a, l, 0.7, l.describe());
      }
    }
  }
}

TEST(DiagOFT, BlockLayoutFollowsFactorization) {
  // docs/training.md#algo-oft examples
  EXPECT_EQ(functional::diag_oft::block_layout(320, 4), (std::pair<int64_t, int64_t>{4, 80}));
  EXPECT_EQ(functional::diag_oft::block_layout(320, 32), (std::pair<int64_t, int64_t>{10, 32}));
  EXPECT_EQ(functional::diag_oft::block_layout(12, 5), (std::pair<int64_t, int64_t>{3, 4}));
  auto a = std::make_shared<DiagOFTImpl>(LayerSpec::linear(4, 320), DiagOFTOptions().rank(8));
  EXPECT_EQ(a->oft_blocks.sizes().vec(), (std::vector<int64_t>{40, 8, 8}));
  EXPECT_THROW(diag_oft_algorithm().create(LayerSpec::linear(4, 8), DiagOFTOptions().rank(0)), OptionError);
  EXPECT_THROW(diag_oft_algorithm().create(LayerSpec::linear(4, 8), DiagOFTOptions().constraint(-1)), OptionError);
  EXPECT_THROW(diag_oft_algorithm().create(LayerSpec::group_norm(2, 8), DiagOFTOptions()), OptionError);
}

TEST(DiagOFT, LoadRejectsMalformed) {
  auto algo = diag_oft_algorithm();
  auto l = LayerSpec::linear(4, 8);
  EXPECT_NO_THROW(algo.load("lycoris_o", {{"oft_blocks", torch::zeros({4, 2, 2})}}, l));  // alpha missing → 0
  EXPECT_EQ(algo.load("lycoris_o", {{"oft_blocks", torch::zeros({4, 2, 2})}}, l)->alpha(), 0.0);
  try {
    algo.load("lycoris_o", {{"oft_blocks", torch::zeros({3, 2, 2})}, {"alpha", torch::tensor(0.0)}}, l);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("lycoris_o.oft_blocks"), std::string::npos) << e.what();
  }
  EXPECT_THROW(algo.load("lycoris_o", {{"oft_blocks", torch::zeros({4, 2, 3})}}, l), ShapeError);
  EXPECT_THROW(algo.load("lycoris_o", {{"oft_blocks", torch::zeros({4, 2, 2})}, {"rescale", torch::ones({8})}}, l),
               ShapeError);
  EXPECT_THROW(algo.load("lycoris_o", {{"oft_blocks", torch::zeros({4, 2, 2})}, {"lora_up.weight", torch::ones({8})}}, l),
               KeyError);
  // alpha as int64 of shape (1,)
  auto a = algo.load("lycoris_o", {{"oft_blocks", torch::zeros({4, 2, 2})}, {"alpha", torch::tensor({int64_t{2}})}}, l);
  EXPECT_EQ(a->alpha(), 2.0);
  EXPECT_FALSE(algo.detect({{"oft_blocks", torch::zeros({1, 4, 2, 2})}}));
}

TEST(DiagOFT, LowPrecisionHostAndDropouts) {
  for (const auto& l : test::host_layers()) {
    auto a = std::make_shared<DiagOFTImpl>(l, DiagOFTOptions().algo("diag-oft").rank(2).rescaled(true));
    test::randomize(*a);
    test::expect_low_precision_host(*a, l, l.describe());
    test::expect_module_dropout(diag_oft_algorithm(), DiagOFTOptions().algo("diag-oft").rank(2), l);
  }
  // rank_dropout: inverted dropout on the entries of m·R, training only (docs/loaders.md#q51-diag-oft-dropout)
  auto l = LayerSpec::linear(4, 8);
  auto a = diag_oft_algorithm().create(l, DiagOFTOptions().algo("diag-oft").rank(4).rank_dropout(0.5));
  test::randomize(*a);
  auto W = torch::randn(l.weight_shape());
  torch::NoGradGuard g;
  a->eval();
  auto w_eval = a->apply_weight(W, 1.0);
  auto M = functional::diag_oft::matrices(std::dynamic_pointer_cast<DiagOFTImpl>(a)->oft_blocks, 0, 8, 1.0, W);
  EXPECT_TRUE(test::all_close(w_eval, functional::diag_oft::rotate_rows(W, M), 1e-6, 0));
  a->train();
  torch::manual_seed(5);
  EXPECT_FALSE(torch::allclose(a->apply_weight(W, 1.0), w_eval));
}

TEST(DiagOFT, Golden) {
  for (const char* c : {"diag_oft", "diag_oft_constraint", "diag_oft_rescaled"})
    EXPECT_EQ(test::check_golden(c, {diag_oft_algorithm()}), 9) << c;
}

}  // namespace diag_oft_test
