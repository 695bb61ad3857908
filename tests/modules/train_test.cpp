// Training with every algorithm (docs/training.md): 50 AdamW steps on a small regression task lower the
// loss, the host weights stay bit-identical, and DyLoRA's block schedule (§4.9) trains one block per step
// and can be saved / resized at a chosen rank.
//
// Task: teacher = the base layer adapted by the same algorithm at random parameters (a small perturbation
// the student can represent exactly); student = base + a freshly initialised adapter (ΔW = 0); loss = MSE
// between their outputs on a fixed batch, measured in evaluation mode before and after training.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/modules/dylora.hpp"
#include "test_util.hpp"

namespace train_test {

using namespace lycoris;
using lycoris::test::all_close;

const LayerSpec kLinear = LayerSpec::linear(12, 16);
const LayerSpec kConv = LayerSpec::conv(4, 8, {3, 3}, {1, 1}, {1, 1});

struct Case {
  std::string name;
  LayerSpec layer;
  AdapterOptions options;
  double lr = 1e-2;
  double max_ratio = 0.5;  // final loss < max_ratio · initial loss
};

AdapterOptions algo(const std::string& name, int64_t rank = 4) { return AdapterOptions().algo(name).rank(rank).alpha(rank); }

// Thresholds: the worst final/initial ratio over seeds 1–10 (rebuild and bypass; LYCORIS_TRAIN_SEEDS=10)
// times about 1.5.
std::vector<Case> cases() {
  return {
      {"lora linear", kLinear, algo("lora"), 1e-2, 0.15},
      {"lora conv tucker", kConv, algo("lora").tucker(true), 1e-2, 0.2},
      {"lora linear dora", kLinear, algo("lora").dora(true), 1e-2, 0.1},
      {"loha linear", kLinear, algo("loha"), 1e-2, 0.25},
      {"loha conv", kConv, algo("loha"), 1e-2, 0.45},
      {"lokr linear", kLinear, algo("lokr", 2), 1e-2, 0.3},
      {"lokr conv", kConv, algo("lokr", 2), 1e-2, 0.65},
      {"lokr linear decompose_both dora", kLinear, algo("lokr", 1).decompose_both(true).dora(true), 1e-2, 0.45},
      {"full linear", kLinear, algo("full"), 1e-2, 0.05},
      {"full conv", kConv, algo("full"), 1e-2, 0.05},
      {"ia3 linear", kLinear, algo("ia3"), 1e-2, 0.07},
      {"ia3 conv on input", kConv, algo("ia3").train_on_input(true), 1e-2, 0.02},
      {"dylora linear", kLinear, algo("dylora", 4).block_size(2), 1e-2, 0.35},
      {"dylora conv", kConv, algo("dylora", 4).block_size(2), 1e-2, 0.4},
      {"glora linear", kLinear, algo("glora"), 1e-2, 0.12},
      {"glora conv", kConv, algo("glora"), 1e-2, 0.2},
      {"glokr linear", kLinear, algo("glokr", 2), 1e-2, 0.55},
      {"diag-oft linear", kLinear, algo("diag-oft", 4), 1e-2, 0.02},
      {"diag-oft conv rescaled", kConv, algo("diag-oft", 4).rescaled(true), 1e-2, 0.03},
      {"boft linear", kLinear, algo("boft", 4), 1e-2, 0.08},
      {"boft conv constraint", kConv, algo("boft", 4).constraint(1.0), 1e-2, 0.01},
      {"norm layernorm", LayerSpec::layer_norm(16), algo("norm"), 1e-2, 0.04},
      {"norm groupnorm", LayerSpec::group_norm(4, 8), algo("norm"), 1e-2, 0.07},
  };
}

torch::Tensor input_for(const LayerSpec& l) {
  switch (l.kind) {
    case LayerKind::Linear: return torch::randn({32, l.in_features});
    case LayerKind::LayerNorm: return torch::randn({32, l.out_features});
    case LayerKind::GroupNorm: return torch::randn({8, l.out_features, 6});
    default: return torch::randn({4, l.in_features, 6, 6});
  }
}

struct Result {
  double initial = 0, final = 0;
  bool base_untouched = false;
};

Result train(const Case& c, bool bypass, uint64_t seed) {
  torch::manual_seed(seed);
  const auto& algorithm = find_algorithm(c.options.algo());
  const auto& l = c.layer;
  auto W = l.is_norm() ? 1 + 0.1 * torch::randn(l.weight_shape()) : 0.5 * torch::randn(l.weight_shape());
  auto b = 0.1 * torch::randn({l.out_features});
  const auto W_copy = W.clone(), b_copy = b.clone();
  auto x = input_for(l);

  torch::Tensor target;
  {
    auto teacher = algorithm.create(l, c.options);
    teacher->eval();
    torch::NoGradGuard g;
    teacher->apply_weight(W, 1.0);  // DoRA: magnitude from the host weight
    for (auto& p : teacher->parameters()) p.add_(torch::randn_like(p) * 0.2);
    target = layer_forward(x, l, teacher->apply_weight(W, 1.0), teacher->apply_bias(b, 1.0));
  }

  auto student = algorithm.create(l, c.options);
  auto forward = [&] {
    return bypass ? student->bypass_forward(x, W, b, 1.0)
                  : layer_forward(x, l, student->apply_weight(W, 1.0), student->apply_bias(b, 1.0));
  };
  auto eval_loss = [&] {
    student->eval();
    torch::NoGradGuard g;
    return torch::mse_loss(forward(), target).item<double>();
  };
  Result r;
  r.initial = eval_loss();
  torch::optim::AdamW opt(student->parameters(), torch::optim::AdamWOptions(c.lr));
  student->train();
  for (int step = 0; step < 50; ++step) {
    student->on_step();
    opt.zero_grad();
    torch::mse_loss(forward(), target).backward();
    opt.step();
  }
  r.final = eval_loss();
  r.base_untouched = torch::equal(W, W_copy) && torch::equal(b, b_copy);
  return r;
}


class AdapterTraining : public ::testing::TestWithParam<Case> {};

TEST_P(AdapterTraining, AdamWLowersTheLossAndKeepsTheBase) {
  const Case& c = GetParam();
  // LYCORIS_TRAIN_SEEDS=n: print the ratios over seeds 1..n (how the thresholds were chosen)
  const char* env = std::getenv("LYCORIS_TRAIN_SEEDS");
  const int seeds = env ? std::atoi(env) : 2;
  for (bool bypass : {false, true}) {
    double worst = 0;
    for (int seed = 1; seed <= seeds; ++seed) {
      auto r = train(c, bypass, static_cast<uint64_t>(seed));
      const std::string what = c.name + (bypass ? " (bypass)" : " (rebuild)") + " seed " + std::to_string(seed);
      EXPECT_GT(r.initial, 0) << what;
      EXPECT_LT(r.final, c.max_ratio * r.initial) << what << ": initial " << r.initial << ", final " << r.final;
      EXPECT_TRUE(r.base_untouched) << what << ": host weight or bias changed";
      worst = std::max(worst, r.final / r.initial);
    }
    if (env) std::cout << c.name << (bypass ? " bypass" : " rebuild") << ": worst ratio " << worst << "\n";
  }
}

INSTANTIATE_TEST_SUITE_P(TrainCases, AdapterTraining, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string n = info.param.name;
                           for (auto& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

TEST(AdapterTrainingCoverage, EveryAlgorithmTrains) {
  auto all = cases();
  for (const auto& a : algorithms()) {
    bool found = false;
    for (const auto& c : all) found = found || find_algorithm(c.options.algo()).name == a.name;
    EXPECT_TRUE(found) << a.name;
  }
}

// ---------------------------------------------------------------- DyLoRA block schedule (docs/training.md#dylora-blocks)

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

}  // namespace train_test
