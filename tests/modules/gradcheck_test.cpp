// Autograd vs central finite differences, in double precision, for every algorithm and its variants
// (docs/training.md): the gradient of a scalar loss of the adapted layer's output w.r.t. every adapter
// parameter, through the rebuild path (layer_forward with apply_weight / apply_bias) and through
// bypass_forward. Every parameter is randomised first, so that no factor sits at its zero init (where
// many gradients vanish and a wrong formula could still pass).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cctype>
#include <functional>
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "test_util.hpp"

namespace gradcheck_test {

using namespace lycoris;
using lycoris::test::all_close;

const LayerSpec kLinear = LayerSpec::linear(6, 8);
const LayerSpec kLinearNoBias = LayerSpec::linear(6, 8, false);
const LayerSpec kConv = LayerSpec::conv(4, 8, {3, 3}, {1, 1}, {1, 1});
const LayerSpec kLayerNorm = LayerSpec::layer_norm(8);
const LayerSpec kGroupNorm = LayerSpec::group_norm(2, 8);

struct Case {
  std::string name;
  LayerSpec layer;
  AdapterOptions options;
  double m = 1.0;
  bool train = true;  // DyLoRA runs in eval mode (full rank): in training, earlier blocks are constants
};

AdapterOptions algo(const std::string& name, int64_t rank = 2) { return AdapterOptions().algo(name).rank(rank).alpha(1.5); }

std::vector<Case> cases() {
  return {
      // LoRA / LoCon
      {"lora linear", kLinear, algo("lora")},
      {"lora conv", kConv, algo("lora"), 0.7},
      {"lora conv tucker", kConv, algo("lora").tucker(true)},
      {"lora linear dora out", kLinear, algo("lora").dora(true)},
      {"lora linear dora in", kLinear, algo("lora").dora(true).wd_on_out(false), 0.7},
      {"lora conv dora out", kConv, algo("lora").dora(true), 0.6},
      {"lora conv tucker dora in", kConv, algo("lora").tucker(true).dora(true).wd_on_out(false)},
      {"lora linear rs_lora scalar", kLinear, algo("lora").rs_lora(true).use_scalar(true)},
      {"lora conv scalar", kConv, algo("lora").use_scalar(true), 0.5},
      // LoHa
      {"loha linear", kLinear, algo("loha")},
      {"loha conv", kConv, algo("loha"), 0.7},
      {"loha conv tucker", kConv, algo("loha").tucker(true)},
      {"loha linear dora out scalar", kLinear, algo("loha").dora(true).use_scalar(true)},
      {"loha conv dora in", kConv, algo("loha").dora(true).wd_on_out(false), 0.8},
      // LoKr: Linear 6→8 splits (2,4) × (2,3); Conv2d 4→8 splits (2,4) × (2,2)
      {"lokr linear full", kLinear, algo("lokr", 4)},
      {"lokr linear w2 low-rank", kLinear, algo("lokr", 1), 0.7},
      {"lokr linear decompose_both", kLinear, algo("lokr", 1).decompose_both(true)},
      {"lokr linear factor 2", kLinear, algo("lokr", 1).factor(2)},
      {"lokr linear unbalanced", kLinear, algo("lokr", 1).factor(2).unbalanced_factorization(true)},
      {"lokr linear full_matrix", kLinear, algo("lokr", 1).full_matrix(true)},
      {"lokr linear dora", kLinear, algo("lokr", 1).dora(true), 0.7},
      {"lokr conv", kConv, algo("lokr", 1)},
      {"lokr conv tucker", kConv, algo("lokr", 1).tucker(true), 0.7},
      {"lokr conv decompose_both scalar", kConv, algo("lokr", 1).decompose_both(true).use_scalar(true)},
      {"lokr conv full_matrix", kConv, algo("lokr", 1).full_matrix(true)},
      {"lokr conv dora in", kConv, algo("lokr", 1).dora(true).wd_on_out(false)},
      // Full
      {"full linear", kLinear, algo("full"), 0.7},
      {"full linear no bias", kLinearNoBias, algo("full")},
      {"full conv", kConv, algo("full")},
      // (IA)^3
      {"ia3 linear", kLinear, algo("ia3"), 0.7},
      {"ia3 linear on input", kLinear, algo("ia3").train_on_input(true)},
      {"ia3 conv", kConv, algo("ia3")},
      {"ia3 conv on input", kConv, algo("ia3").train_on_input(true), 0.6},
      // DyLoRA (evaluation: every block used)
      {"dylora linear", kLinear, algo("dylora", 4).block_size(2), 1.0, false},
      {"dylora conv", kConv, algo("dylora", 4).block_size(2), 0.7, false},
      // GLoRA
      {"glora linear", kLinear, algo("glora")},
      {"glora conv", kConv, algo("glora"), 0.7},
      {"glora linear scalar rs_lora", kLinear, algo("glora").use_scalar(true).rs_lora(true)},
      // GLoKr
      {"glokr linear", kLinear, algo("glokr", 1)},
      {"glokr conv", kConv, algo("glokr", 1), 0.7},
      {"glokr linear decompose_both dora", kLinear, algo("glokr", 1).decompose_both(true).dora(true)},
      // Diag-OFT: Linear 8 rows → 4 blocks of 2 (rank 2) or 2 blocks of 4 (rank 4)
      {"diag-oft linear", kLinear, algo("diag-oft", 4)},
      {"diag-oft linear rescaled", kLinear, algo("diag-oft", 2).rescaled(true), 0.7},
      {"diag-oft linear constraint (clipping)", kLinear, algo("diag-oft", 4).constraint(0.01)},
      {"diag-oft linear constraint (inactive)", kLinear, algo("diag-oft", 4).constraint(100.0), 0.8},
      {"diag-oft conv", kConv, algo("diag-oft", 4), 0.6},
      {"diag-oft conv rescaled constraint", kConv, algo("diag-oft", 4).rescaled(true).constraint(0.01)},
      // BOFT: 8 rows, rank 2 → 3 stages of 4 blocks of 2; rank 4 → 2 stages of 2 blocks of 4
      {"boft linear", kLinear, algo("boft", 4)},
      {"boft linear rank 2", kLinear, algo("boft", 2), 0.7},
      {"boft linear rescaled", kLinear, algo("boft", 4).rescaled(true)},
      {"boft linear constraint (clipping)", kLinear, algo("boft", 2).constraint(0.01)},
      {"boft conv rescaled constraint", kConv, algo("boft", 4).rescaled(true).constraint(0.01), 0.8},
      // Norm
      {"norm layernorm", kLayerNorm, algo("norm")},
      {"norm layernorm no bias", LayerSpec::layer_norm(8, 1e-5, false), algo("norm"), 0.7},
      {"norm groupnorm", kGroupNorm, algo("norm"), 0.7},
  };
}

torch::Tensor input_for(const LayerSpec& l) {
  switch (l.kind) {
    case LayerKind::Linear: return torch::randn({2, 3, l.in_features}, torch::kFloat64);
    case LayerKind::LayerNorm: return torch::randn({2, 3, l.out_features}, torch::kFloat64);
    case LayerKind::GroupNorm: return torch::randn({2, l.out_features, 5}, torch::kFloat64);
    default: {
      std::vector<int64_t> shape{2, l.in_features};
      shape.resize(2 + l.kernel.size(), 5);
      return torch::randn(shape, torch::kFloat64);
    }
  }
}

// The host weight: a norm's weight sits around 1, other weights are random.
torch::Tensor weight_for(const LayerSpec& l) {
  auto W = torch::randn(l.weight_shape(), torch::kFloat64);
  return l.is_norm() ? 1 + 0.3 * W : W;
}

// Central differences of loss() w.r.t. every entry of t (t modified in place and restored).
torch::Tensor numeric_gradient(const torch::Tensor& t, const std::function<double()>& loss) {
  const double eps = 1e-6;
  auto flat = t.data().view({-1});
  auto out = torch::zeros({flat.numel()}, torch::kFloat64);
  torch::NoGradGuard g;
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const double v = flat[i].item<double>();
    flat[i] = v + eps;
    const double up = loss();
    flat[i] = v - eps;
    const double down = loss();
    flat[i] = v;
    out[i] = (up - down) / (2 * eps);
  }
  return out.view(t.sizes());
}


class AdapterGradCheck : public ::testing::TestWithParam<Case> {};

TEST_P(AdapterGradCheck, AutogradMatchesFiniteDifferences) {
  const Case& c = GetParam();
  torch::manual_seed(7);
  auto adapter = find_algorithm(c.options.algo()).create(c.layer, c.options);
  adapter->to(torch::kFloat64);
  adapter->train(c.train);
  auto W = weight_for(c.layer);
  auto b = c.layer.has_bias ? torch::randn({c.layer.out_features}, torch::kFloat64) : torch::Tensor();
  auto x = input_for(c.layer);
  {
    // DoRA's magnitude is taken from the host weight on first use; then move every parameter away from its init
    torch::NoGradGuard g;
    adapter->apply_weight(W, c.m);
    for (auto& p : adapter->parameters()) p.add_(torch::randn_like(p) * 0.3);
  }
  auto probe = torch::randn_like(layer_forward(x, c.layer, W, b));
  for (bool bypass : {false, true}) {
    const std::string what = c.name + (bypass ? " (bypass)" : " (rebuild)");
    auto output = [&] {
      return bypass ? adapter->bypass_forward(x, W, b, c.m)
                    : layer_forward(x, c.layer, adapter->apply_weight(W, c.m), adapter->apply_bias(b, c.m));
    };
    // ΔW is non-zero at this point: the adapted output differs from the host's
    {
      torch::NoGradGuard g;
      ASSERT_FALSE(torch::allclose(output(), layer_forward(x, c.layer, W, b), 1e-6, 1e-6)) << what;
    }
    auto loss = [&] { return (output() * probe).sum() + 0.5 * output().pow(2).sum(); };
    adapter->zero_grad();
    loss().backward();
    for (auto& p : adapter->named_parameters()) {
      ASSERT_TRUE(p.value().grad().defined()) << what << ": no gradient reaches " << p.key();
      auto numeric = numeric_gradient(p.value(), [&] { return loss().item<double>(); });
      EXPECT_TRUE(all_close(p.value().grad(), numeric, 1e-6, 1e-5, what + " d/d" + p.key()));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(GradCheckCases, AdapterGradCheck, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string n = info.param.name;
                           for (auto& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

// Every registered algorithm is covered by at least one case above.
TEST(AdapterGradCheckCoverage, EveryAlgorithmHasACase) {
  auto all = cases();
  for (const auto& a : algorithms()) {
    bool found = false;
    for (const auto& c : all) found = found || find_algorithm(c.options.algo()).name == a.name;
    EXPECT_TRUE(found) << a.name;
  }
}

}  // namespace gradcheck_test
