// LoHa (docs/format.md#loha): ΔW = s·(w1a·w1b) ⊙ (w2a·w2b) with s = α / r, r = hada_w1_b rows; with Tucker
// cores each factor is P_n[o, c, κ] = Σ_{i,j} t_n[i, j, κ]·wNa[i, o]·wNb[j, c]. Checked against worked
// examples (values derived by hand), the golden cases of the reference, the formulas written out here with
// einsum, and the generic adapter checks (bypass == rebuild, finite differences, file round trip).
#include "adapter_checks.hpp"
#include "lycoris/modules/loha.hpp"

namespace loha_test {

using namespace lycoris;
using lycoris::test::all_close;

TEST(LoHa, WorkedExample) {
  TensorMap t{{"hada_w1_a", torch::tensor({1.f, 2.f, 3.f}).view({3, 1})},
              {"hada_w1_b", torch::tensor({1.f, 2.f}).view({1, 2})},
              {"hada_w2_a", torch::tensor({1.f, 1.f, 2.f}).view({3, 1})},
              {"hada_w2_b", torch::tensor({3.f, -1.f}).view({1, 2})},
              {"alpha", torch::tensor(0.5f)}};
  auto a = load_adapter("m", t, LayerSpec::linear(2, 3));
  auto W = torch::zeros({3, 2});
  auto expect = torch::tensor({1.5f, -1.f, 3.f, -2.f, 9.f, -6.f}).view({3, 2});
  EXPECT_TRUE(all_close(a->apply_weight(W, 1.0), expect, 1e-6, 0));
}

// docs/format.md#loha: w1a = [[1], [−1]], w1b = [[2, 1]], w2a = [[3], [1]], w2b = [[1, 1]], alpha 2 → s = 2,
// (w1a·w1b) ⊙ (w2a·w2b) = [[6, 3], [−2, −1]]: the scale is applied once.
TEST(LoHa, FormatExample) {
  TensorMap t{{"hada_w1_a", torch::tensor({{1.f}, {-1.f}})}, {"hada_w1_b", torch::tensor({{2.f, 1.f}})},
              {"hada_w2_a", torch::tensor({{3.f}, {1.f}})},  {"hada_w2_b", torch::tensor({{1.f, 1.f}})},
              {"alpha", torch::tensor(2.f)}};
  auto a = loha_algorithm().load("lycoris_m", t, LayerSpec::linear(2, 2));
  EXPECT_TRUE(all_close(a->apply_weight(torch::zeros({2, 2}), 1.0), torch::tensor({{12.f, 6.f}, {-4.f, -2.f}}), 1e-6, 0));
  EXPECT_TRUE(all_close(a->apply_weight(torch::ones({2, 2}), 0.5), torch::tensor({{7.f, 4.f}, {-1.f, 0.f}}), 1e-6, 0));
}

// The two pairs may have different ranks; s uses the first one's.
TEST(LoHa, PairsOfDifferentRanksAndTheFormula) {
  torch::manual_seed(5);
  const auto l = LayerSpec::conv(3, 4, {3});
  const auto w1a = torch::randn({4, 1}), w1b = torch::randn({1, 9}), w2a = torch::randn({4, 3}), w2b = torch::randn({3, 9});
  auto a = loha_algorithm().load(
      "lycoris_m", {{"hada_w1_a", w1a}, {"hada_w1_b", w1b}, {"hada_w2_a", w2a}, {"hada_w2_b", w2b}, {"alpha", torch::tensor(2.f)}},
      l);
  EXPECT_EQ(a->rank(), 1);
  test::expect_delta(*a, (2.0 / 1) * (w1a.matmul(w1b) * w2a.matmul(w2b)).view({4, 3, 3}), -0.3, 1e-5);
}

TEST(LoHa, TuckerDeltaIsTheFormula) {
  torch::manual_seed(6);
  const auto l = LayerSpec::conv(4, 6, {3, 3}, {2, 2}, {1, 1});
  auto a = std::dynamic_pointer_cast<LoHaImpl>(
      loha_algorithm().create(l, AdapterOptions().algo("loha").rank(2).alpha(1).tucker(true)));
  ASSERT_TRUE(a && a->hada_t1.defined() && a->hada_t2.defined());
  test::randomize(*a);
  a->to(torch::kFloat64);
  auto P = [](const torch::Tensor& t, const torch::Tensor& wa, const torch::Tensor& wb) {
    return torch::einsum("ijxy,io,jc->ocxy", {t.detach(), wa.detach(), wb.detach()});
  };
  test::expect_delta(*a, 0.5 * P(a->hada_t1, a->hada_w1_a, a->hada_w1_b) * P(a->hada_t2, a->hada_w2_a, a->hada_w2_b),
                     0.7, 1e-12);
}

TEST(LoHa, GenericChecksOfEveryVariant) {
  const auto o = AdapterOptions().algo("loha").rank(2).alpha(1.5);
  test::expect_generic_adapter(loha_algorithm(), {{"plain", o},
                                                  {"tucker", AdapterOptions(o).tucker(true)},
                                                  {"dora", AdapterOptions(o).dora(true)},
                                                  {"scalar", AdapterOptions(o).use_scalar(true)}});
}

TEST(LoHa, Golden) {
  for (const char* c : {"loha", "loha_tucker", "loha_alpha"}) EXPECT_EQ(test::check_golden(c, {loha_algorithm()}), 9) << c;
}

}  // namespace loha_test
