// Training with every algorithm (docs/training.md): 50 AdamW steps on a small regression task lower the
// loss and the host weights stay bit-identical (DyLoRA's block schedule: modules/dylora_test.cpp).
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

}  // namespace train_test
