// DyLoRA (docs/format.md#dylora, docs/training.md#dylora-blocks): trained one rank block per step, saved as a
// plain LoRA file at full rank with the raw alpha, and loadable at any multiple of the block size. Checked
// against W + (α / r_used)·U[:, :r_used]·D[:r_used] written out here, the golden cases of the reference read
// through the DyLoRA loader, and the generic adapter checks (bypass == rebuild, finite differences, round trip).
#include "adapter_checks.hpp"
#include "lycoris/error.hpp"
#include "lycoris/modules/dylora.hpp"

namespace dylora_test {

using namespace lycoris;
using lycoris::test::all_close;

// DyLoRA files are LoRA files (docs/format.md#detection): the DyLoRA loader, offered every LoRA module.
Algorithm dylora_reader() {
  auto a = dylora_algorithm();
  a.detect = lora_algorithm().detect;
  return a;
}

std::shared_ptr<DyLoRAImpl> dylora(const LayerSpec& l, int64_t rank, int64_t block_size, double alpha) {
  auto a = std::dynamic_pointer_cast<DyLoRAImpl>(
      find_algorithm("dylora").create(l, AdapterOptions().algo("dylora").rank(rank).block_size(block_size).alpha(alpha)));
  EXPECT_TRUE(a != nullptr);
  return a;
}

void perturb(AdapterImpl& a) {
  torch::NoGradGuard g;
  for (auto& p : a.parameters()) p.add_(torch::randn_like(p) * 0.3);
}

// W + (α / r_used) · U[:, :r_used] · D[:r_used] reshaped (blocks 0…n−1, r_used = n·bs).
torch::Tensor expected_weight(const DyLoRAImpl& a, const torch::Tensor& W, int64_t used, double alpha) {
  auto up = a.lora_up.detach().reshape({a.lora_up.size(0), -1}).slice(1, 0, used);
  auto down = a.lora_down.detach().reshape({a.lora_down.size(0), -1}).slice(0, 0, used);
  return W + (alpha / static_cast<double>(used)) * torch::matmul(up, down).reshape(W.sizes());
}

TEST(DyLoRASchedule, OnlyTheChosenBlockReceivesGradient) {
  torch::manual_seed(3);
  const auto l = LayerSpec::linear(6, 8);
  auto a = dylora(l, 6, 2, 3.0);
  perturb(*a);
  auto W = torch::randn(l.weight_shape());
  auto x = torch::randn({5, 6});
  a->train();
  for (int64_t n = 1; n <= 3; ++n) {
    a->set_active_blocks(n);
    auto Wn = a->apply_weight(W, 1.0);
    // blocks 0…n−1 used, scale α / (n·bs): the scale the file gives the rank-n·bs sub-model
    EXPECT_TRUE(all_close(Wn, expected_weight(*a, W, 2 * n, 3.0), 1e-5, 1e-5, "W' with " + std::to_string(n) + " blocks"));
    a->zero_grad();
    (layer_forward(x, l, Wn, {}) * torch::randn({5, 8})).sum().backward();
    for (int64_t k = 0; k < 3; ++k) {
      auto gd = a->lora_down.grad().slice(0, 2 * k, 2 * k + 2);
      auto gu = a->lora_up.grad().slice(1, 2 * k, 2 * k + 2);
      if (k == n - 1) {
        EXPECT_GT(gd.abs().max().item<double>(), 0) << "block " << k << " of " << n;
        EXPECT_GT(gu.abs().max().item<double>(), 0) << "block " << k << " of " << n;
      } else {
        EXPECT_EQ(gd.abs().max().item<double>(), 0) << "block " << k << " of " << n;
        EXPECT_EQ(gu.abs().max().item<double>(), 0) << "block " << k << " of " << n;
      }
    }
  }
  EXPECT_THROW(a->set_active_blocks(0), OptionError);
  EXPECT_THROW(a->set_active_blocks(4), OptionError);
}

TEST(DyLoRASchedule, EvaluationUsesEveryBlockDeterministically) {
  torch::manual_seed(4);
  const auto l = LayerSpec::conv(4, 8, {3, 3}, {1, 1}, {1, 1});
  auto a = dylora(l, 6, 2, 3.0);
  perturb(*a);
  auto W = torch::randn(l.weight_shape());
  a->eval();
  torch::NoGradGuard g;
  a->set_active_blocks(1);
  auto first = a->apply_weight(W, 1.0);
  a->on_step();
  a->set_active_blocks(2);
  EXPECT_TRUE(torch::equal(first, a->apply_weight(W, 1.0)));
  EXPECT_TRUE(all_close(first, expected_weight(*a, W, 6, 3.0), 1e-5, 1e-5, "eval W' = W + α/r·U·D"));
  auto x = torch::randn({2, 4, 5, 5});
  EXPECT_TRUE(torch::equal(a->bypass_forward(x, W, {}, 0.7), a->bypass_forward(x, W, {}, 0.7)));
}

TEST(DyLoRASchedule, OnStepDrawsEveryBlockCountUniformly) {
  torch::manual_seed(5);
  auto a = dylora(LayerSpec::linear(6, 8), 8, 2, 1.0);
  std::vector<int> counts(5, 0);
  const int draws = 4000;
  for (int i = 0; i < draws; ++i) {
    a->on_step();
    ASSERT_GE(a->active_blocks(), 1);
    ASSERT_LE(a->active_blocks(), 4);
    ++counts[static_cast<size_t>(a->active_blocks())];
  }
  for (int n = 1; n <= 4; ++n) EXPECT_NEAR(counts[static_cast<size_t>(n)] / double(draws), 0.25, 0.03) << n;
}

// The per-step state checkpoints save and data-parallel training broadcasts: DyLoRA's block count, taken back
// exactly (the trained sub-model follows it), refused out of range; algorithms without one refuse any.
TEST(DyLoRASchedule, StepStateIsTheBlockCountAndOtherAlgorithmsHaveNone) {
  torch::manual_seed(9);
  auto a = dylora(LayerSpec::linear(6, 8), 8, 2, 1.0);
  perturb(*a);
  a->train();
  const auto W = torch::randn({8, 6});
  a->set_active_blocks(3);
  EXPECT_EQ(a->step_state(), std::vector<int64_t>{3});
  a->on_step();
  a->set_step_state({2});
  EXPECT_EQ(a->active_blocks(), 2);
  EXPECT_TRUE(all_close(a->apply_weight(W, 1.0), expected_weight(*a, W, 4, 1.0), 1e-6, 1e-6, "two blocks"));
  for (const std::vector<int64_t>& bad : {std::vector<int64_t>{0}, {5}, {}, {1, 1}})
    EXPECT_THROW(a->set_step_state(bad), OptionError);
  EXPECT_EQ(a->active_blocks(), 2);

  auto lora = find_algorithm("lora").create(LayerSpec::linear(6, 8), AdapterOptions().algo("lora").rank(2));
  EXPECT_TRUE(lora->step_state().empty());
  EXPECT_NO_THROW(lora->set_step_state({}));
  EXPECT_THROW(lora->set_step_state({1}), OptionError);
}

TEST(DyLoRASchedule, SavedAtAChosenRankIsTheTrainedSubModel) {
  torch::manual_seed(6);
  const auto l = LayerSpec::conv(4, 8, {3, 3}, {1, 1}, {1, 1});
  auto a = dylora(l, 6, 2, 3.0);
  perturb(*a);
  auto W = torch::randn(l.weight_shape());
  for (int64_t R : {2, 4, 6}) {
    auto saved = a->file_tensors(R);
    TensorMap t;
    std::vector<std::string> keys;
    for (auto& [k, v] : saved) {
      t[k] = v;
      keys.push_back(k);
    }
    EXPECT_EQ(keys, (std::vector<std::string>{"alpha", "lora_up.weight", "lora_down.weight"}));
    EXPECT_EQ(t["lora_up.weight"].sizes(), (std::vector<int64_t>{8, R, 1, 1}));  // not 2-D (docs/loaders.md#q23-dylora fix)
    EXPECT_EQ(t["lora_down.weight"].sizes(), (std::vector<int64_t>{R, 4, 3, 3}));
    EXPECT_EQ(t["alpha"].item<double>(), 3.0);  // raw alpha: alpha / R is the training scale of the sub-model
    auto loaded = load_adapter("lycoris_m", t, l);
    EXPECT_EQ(loaded->algo(), "lora");  // DyLoRA files are LoRA files
    loaded->eval();
    a->train();
    a->set_active_blocks(R / 2);
    torch::NoGradGuard g;
    EXPECT_TRUE(all_close(loaded->apply_weight(W, 0.8), a->apply_weight(W, 0.8), 1e-5, 1e-5,
                          "rank " + std::to_string(R) + " file vs training sub-model"));
  }
  // full rank: what evaluation uses
  auto full = a->file_tensors();
  TensorMap t;
  for (auto& [k, v] : full) t[k] = v;
  a->eval();
  torch::NoGradGuard g;
  EXPECT_TRUE(all_close(load_adapter("lycoris_m", t, l)->apply_weight(W, 1.0), a->apply_weight(W, 1.0), 1e-5, 1e-5,
                        "full-rank file vs evaluation"));
  for (int64_t bad : {0, 3, 8}) EXPECT_THROW(a->file_tensors(bad), OptionError) << bad;
}

TEST(DyLoRASchedule, TrainingReachesEveryBlockAndEverySubModelImproves) {
  torch::manual_seed(8);
  const auto l = LayerSpec::linear(12, 16);
  auto W = 0.5 * torch::randn(l.weight_shape());
  auto x = torch::randn({32, 12});
  // teacher: a rank-6 perturbation
  auto target = layer_forward(x, l, W + 0.3 * torch::matmul(torch::randn({16, 6}), torch::randn({6, 12})) / 6, {});
  auto a = dylora(l, 6, 2, 6.0);
  const auto down0 = a->lora_down.detach().clone(), up0 = a->lora_up.detach().clone();
  torch::optim::AdamW opt(a->parameters(), torch::optim::AdamWOptions(1e-2));
  a->train();
  for (int step = 0; step < 50; ++step) {
    a->on_step();
    opt.zero_grad();
    torch::mse_loss(layer_forward(x, l, a->apply_weight(W, 1.0), {}), target).backward();
    opt.step();
  }
  for (int64_t k = 0; k < 3; ++k) {
    EXPECT_FALSE(torch::equal(a->lora_down.detach().slice(0, 2 * k, 2 * k + 2), down0.slice(0, 2 * k, 2 * k + 2))) << k;
    EXPECT_FALSE(torch::equal(a->lora_up.detach().slice(1, 2 * k, 2 * k + 2), up0.slice(1, 2 * k, 2 * k + 2))) << k;
  }
  torch::NoGradGuard g;
  const double initial = torch::mse_loss(layer_forward(x, l, W, {}), target).item<double>();
  double previous = initial;
  for (int64_t R : {2, 4, 6}) {
    TensorMap t;
    for (auto& [k, v] : a->file_tensors(R)) t[k] = v;
    const double loss = torch::mse_loss(layer_forward(x, l, load_adapter("m", t, l)->apply_weight(W, 1.0), {}), target)
                            .item<double>();
    EXPECT_LT(loss, 0.8 * initial) << "rank " << R;
    EXPECT_LT(loss, previous * 1.05) << "rank " << R << " should not be worse than a smaller rank";
    previous = loss;
  }
}

// The reference writes a conv's lora_up 2-D (O, r) (docs/loaders.md#q23-dylora); both loaders read it as
// (O, r, 1, 1), and ΔW[o, c, κ] = (α / r)·Σ_j up[o, j]·down[j, c, κ].
TEST(DyLoRA, TwoDimensionalConvUpIsReadAsPointwise) {
  torch::manual_seed(9);
  const auto l = LayerSpec::conv(4, 6, {3, 3}, {1, 1}, {1, 1});
  const auto down = torch::randn({4, 4, 3, 3}), up = torch::randn({6, 4});
  const auto W = torch::randn(l.weight_shape());
  const auto expected = W + 0.5 * (3.0 / 4) * torch::einsum("oj,jcxy->ocxy", {up, down});
  for (const auto& algo : {lora_algorithm(), dylora_algorithm()}) {
    for (const auto& u : {up, up.view({6, 4, 1, 1})}) {
      SCOPED_TRACE(algo.name + " lora_up " + c10::str(u.sizes()));
      auto a = algo.load("lycoris_m", {{"lora_down.weight", down}, {"lora_up.weight", u}, {"alpha", torch::tensor(3.f)}}, l);
      a->eval();
      torch::NoGradGuard g;
      EXPECT_TRUE(all_close(a->apply_weight(W, 0.5), expected, 1e-5, 1e-5));
    }
  }
}

TEST(DyLoRA, GenericChecks) {
  const auto o = AdapterOptions().algo("dylora");
  test::expect_generic_adapter(dylora_reader(), {{"blocks of 2", AdapterOptions(o).rank(4).block_size(2).alpha(3)},
                                                 {"blocks of 1", AdapterOptions(o).rank(3).block_size(1)}});
}

TEST(DyLoRA, Golden) {
  EXPECT_EQ(test::check_golden("dylora", {dylora_reader()}), 6);
  EXPECT_EQ(test::check_golden("dylora_conv", {dylora_reader()}), 9);
}

}  // namespace dylora_test
