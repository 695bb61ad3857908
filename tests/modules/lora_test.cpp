// LoRA / LoCon (docs/format.md#lora): ΔW = s·up·down with s = α / r, the Tucker core, the sparse bias of
// extracted files and DoRA. Checked against the worked examples of docs/format.md (values derived by hand
// from the formulas), the golden cases of the reference, the formulas written out here with einsum, and the
// generic adapter checks (bypass == rebuild, finite differences, file round trip).
#include <cmath>

#include "adapter_checks.hpp"
#include "lycoris/modules/lora.hpp"

namespace lora_test {

using namespace lycoris;

// docs/format.md#lora: up = [[2], [1]], down = [[1, 0, −1]] on a Linear 3 → 2, alpha 0.5 (s = 0.5) or none (s = 1).
TensorMap example(bool with_alpha) {
  TensorMap t{{"lora_up.weight", torch::tensor({{2.0f}, {1.0f}})},
              {"lora_down.weight", torch::tensor({{1.0f, 0.0f, -1.0f}})}};
  if (with_alpha) t["alpha"] = torch::tensor(0.5f);
  return t;
}

AdapterPtr load_lora(const TensorMap& t, const LayerSpec& layer) { return lora_algorithm().load("lycoris_m", t, layer); }

TEST(LoRA, WorkedExample) {
  const auto l = LayerSpec::linear(3, 2);
  const auto dW = torch::tensor({{1.0f, 0.0f, -1.0f}, {0.5f, 0.0f, -0.5f}});
  EXPECT_TRUE(test::all_close(load_lora(example(true), l)->apply_weight(torch::zeros({2, 3}), 1.0), dW, 1e-7, 0));
  EXPECT_TRUE(test::all_close(load_lora(example(false), l)->apply_weight(torch::zeros({2, 3}), 1.0), 2 * dW, 1e-7, 0,
                              "no alpha: s = 1"));
  // W' = W + m·ΔW
  const auto W = torch::tensor({{1.0f, 2.0f, 3.0f}, {4.0f, 5.0f, 6.0f}});
  EXPECT_TRUE(test::all_close(load_lora(example(true), l)->apply_weight(W, 0.5), W + 0.5 * dW, 1e-6, 0, "m = 0.5"));
}

// docs/format.md#sparse-bias: the example plus E[0, 2] = 10, added to ΔW without s; merged at m = 0.5.
TEST(LoRA, SparseBiasExample) {
  auto t = example(true);
  t["bias_size"] = torch::tensor({2, 3}, torch::kInt16);
  t["bias_indices"] = torch::tensor({0, 2}, torch::kInt16).view({2, 1});
  t["bias_values"] = torch::tensor({10.0f});
  auto out = load_lora(t, LayerSpec::linear(3, 2))->apply_weight(torch::zeros({2, 3}), 0.5);
  EXPECT_NEAR(out[0][2].item<double>(), 0.5 * (-1 + 10), 1e-6);
  EXPECT_TRUE(test::all_close(out, torch::tensor({{0.5f, 0.0f, 4.5f}, {0.25f, 0.0f, -0.25f}}), 1e-6, 0));
}

// docs/format.md#dora: W = diag(3, 4), up = [[1], [0]], down = [[0, 1]], alpha 1, so V = W + ΔW = [[3, 1], [0, 4]].
TEST(LoRA, DoRAExample) {
  const auto l = LayerSpec::linear(2, 2);
  const auto W = torch::tensor({{3.0f, 0.0f}, {0.0f, 4.0f}});
  auto dora = [&](torch::Tensor scale) {
    return load_lora({{"lora_up.weight", torch::tensor({{1.0f}, {0.0f}})},
                 {"lora_down.weight", torch::tensor({{0.0f, 1.0f}})},
                 {"alpha", torch::tensor(1.0f)},
                 {"dora_scale", scale}},
                l);
  };
  // output axis: row norms √10 and 4, g = [3/√10, 1]; g' = m·(g − 1) + 1
  auto rows = dora(torch::tensor({{3.0f}, {4.0f}}));
  const double g = 3 / std::sqrt(10.0);
  for (double m : {1.0, 0.5, 0.0}) {
    const double gm = m * (g - 1) + 1;
    EXPECT_TRUE(test::all_close(rows->apply_weight(W, m), torch::tensor({{3 * gm, gm}, {0.0, 4.0}}), 1e-6, 1e-6,
                                "rows, m = " + std::to_string(m)));
  }
  EXPECT_TRUE(test::all_close(rows->apply_weight(W, 1.0), torch::tensor({{2.8460, 0.9487}, {0.0, 4.0}}), 1e-4, 0,
                              "the rounded values of the docs"));
  // input axis: column norms 3 and √17
  auto cols = dora(torch::tensor({{3.0f, 4.0f}}));
  const double h = 4 / std::sqrt(17.0);
  EXPECT_TRUE(test::all_close(cols->apply_weight(W, 1.0), torch::tensor({{3.0, h}, {0.0, 4 * h}}), 1e-6, 1e-6, "columns"));
  EXPECT_TRUE(test::all_close(cols->apply_weight(W, 1.0), torch::tensor({{3.0, 0.9701}, {0.0, 3.8806}}), 1e-4, 0,
                              "the rounded values of the docs"));
}

// ΔW[o, c, κ] = s·Σ_j up[o, j]·down[j, c, κ], and with Tucker s·Σ_{i,j} up[o, i]·mid[i, j, κ]·down[j, c].
TEST(LoRA, ConvDeltaIsTheFormula) {
  torch::manual_seed(3);
  const auto l = LayerSpec::conv(4, 6, {3, 2}, {1, 1}, {1, 0});
  for (bool tucker : {false, true}) {
    SCOPED_TRACE(tucker ? "tucker" : "plain");
    auto a = std::dynamic_pointer_cast<LoRAImpl>(
        lora_algorithm().create(l, AdapterOptions().algo("lora").rank(2).alpha(3).tucker(tucker)));
    ASSERT_TRUE(a);
    test::randomize(*a);
    a->to(torch::kFloat64);
    ASSERT_EQ(a->lora_mid.defined(), tucker);
    const auto up = a->lora_up.detach().flatten(1);
    const double s = 3.0 / 2;
    const auto dW = tucker ? s * torch::einsum("oi,ijxy,jc->ocxy", {up, a->lora_mid.detach(), a->lora_down.detach().flatten(1)})
                           : s * torch::einsum("oj,jcxy->ocxy", {up, a->lora_down.detach()});
    test::expect_delta(*a, dW, 0.7, 1e-12);
  }
}

// W' = W + m·s·up·down is built by one addmm (the merge kernel, differentiable) instead of ΔW and three
// weight-sized passes: the same values as the formula, the same bits as merge, the same gradients.
TEST(LoRA, AdaptedWeightIsTheMergeKernelBitForBitWithTheFormulasGradients) {
  torch::manual_seed(5);
  const auto l = LayerSpec::conv(6, 8, {3, 3}, {1, 1}, {1, 1});
  auto a = std::dynamic_pointer_cast<LoRAImpl>(
      lora_algorithm().create(l, AdapterOptions().algo("lora").rank(3).alpha(2)));
  ASSERT_TRUE(a);
  test::randomize(*a);
  a->train();
  const auto W = torch::randn({8, 6, 3, 3});
  const double m = 0.7, s = 2.0 / 3;
  const auto G = torch::randn({8, 6, 3, 3});
  auto fused = a->apply_weight(W, m);
  (fused * G).sum().backward();
  const auto g_up = a->lora_up.grad().clone(), g_down = a->lora_down.grad().clone();
  a->lora_up.mutable_grad().zero_();
  a->lora_down.mutable_grad().zero_();
  auto formula = W + m * s * torch::matmul(a->lora_up.flatten(1), a->lora_down.flatten(1)).view(W.sizes());
  (formula * G).sum().backward();
  EXPECT_TRUE(test::all_close(fused, formula, 1e-6, 1e-6, "W'"));
  EXPECT_TRUE(test::all_close(g_up, a->lora_up.grad(), 1e-5, 1e-6, "d up"));
  EXPECT_TRUE(test::all_close(g_down, a->lora_down.grad(), 1e-5, 1e-6, "d down"));
  // merge writes W + m·ΔW with its row kernel: the same bits
  a->eval();
  auto kernel = a->row_kernel(m, W.options(), W.sizes());
  ASSERT_TRUE(kernel);
  auto merged = W.clone().view({8, -1});
  kernel->apply(merged, 0, 8);
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(a->apply_weight(W, m), merged.view(W.sizes())));
  EXPECT_TRUE(torch::equal(fused.detach(), merged.view(W.sizes())));
}

TEST(LoRA, GenericChecksOfEveryVariant) {
  const auto o = AdapterOptions().algo("lora").rank(2).alpha(1.5);
  test::expect_generic_adapter(lora_algorithm(), {{"plain", o},
                                                  {"tucker", AdapterOptions(o).tucker(true)},
                                                  {"dora out", AdapterOptions(o).dora(true)},
                                                  {"dora in", AdapterOptions(o).dora(true).wd_on_out(false)},
                                                  {"scalar rs_lora", AdapterOptions(o).use_scalar(true).rs_lora(true)}});
}

TEST(LoRA, Golden) {
  for (const char* c : {"lora", "lora_tucker", "lora_dora", "lora_dora_wd_in", "lora_rs", "lora_scalar_fp16"})
    EXPECT_EQ(test::check_golden(c, {lora_algorithm()}), 9) << c;
  EXPECT_EQ(test::check_golden("norm", {lora_algorithm()}), 9) << "the LoCon modules of the Norm case";
}

}  // namespace lora_test
