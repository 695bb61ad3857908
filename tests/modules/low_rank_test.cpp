// The low-rank family together (LoRA, LoHa, LoKr, DyLoRA; modules/low_rank.hpp): bypass == rebuild and the
// file round trip for every variant on random factors, ΔW = 0 at init, malformed files and options. Each
// algorithm's own tests are in modules/<algo>_test.cpp.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "test_util.hpp"

namespace low_rank_test {

using namespace lycoris;
using lycoris::test::all_close;

// bypass == rebuild for every algorithm/variant on randomised (non-zero) factors
TEST(LowRank, BypassEqualsRebuild) {
  torch::manual_seed(0);
  std::vector<LayerSpec> layers{LayerSpec::linear(12, 8), LayerSpec::conv(6, 8, {3}, {2}, {1}),
                                LayerSpec::conv(6, 8, {3, 3}, {2, 2}, {1, 1}), LayerSpec::conv(4, 8, {3, 3, 3}, {1, 1, 1}, {1, 1, 1})};
  std::vector<AdapterOptions> opts{AdapterOptions().algo("lora").rank(2).alpha(1).use_scalar(true),
                                   AdapterOptions().algo("lora").rank(2).tucker(true).use_scalar(true),
                                   AdapterOptions().algo("loha").rank(2).use_scalar(true),
                                   AdapterOptions().algo("loha").rank(2).tucker(true).use_scalar(true),
                                   AdapterOptions().algo("lokr").rank(1).use_scalar(true),
                                   AdapterOptions().algo("lokr").rank(1).decompose_both(true).tucker(true).use_scalar(true),
                                   AdapterOptions().algo("lokr").rank(100).use_scalar(true)};
  for (const auto& layer : layers)
    for (const auto& o : opts) {
      auto a = find_algorithm(o.algo()).create(layer, o);
      a->eval();
      { torch::NoGradGuard g; for (auto& p : a->parameters()) p.normal_(); }
      auto W = torch::randn(layer.weight_shape()), b = torch::randn({layer.out_features});
      std::vector<int64_t> xs{2, layer.in_features};
      for (size_t i = 0; i < layer.kernel.size(); ++i) xs.push_back(7);
      auto x = torch::randn(xs);
      auto rebuild = layer_forward(x, layer, a->apply_weight(W, 0.7), b);
      auto bypass = a->bypass_forward(x, W, b, 0.7);
      EXPECT_TRUE(all_close(bypass, rebuild, 1e-4, 1e-4, o.algo() + " " + layer.describe()));
      // round trip through file_tensors → load
      TensorMap t;
      for (auto& kv : a->file_tensors()) t[kv.first] = kv.second;
      auto back = load_adapter("m", t, layer);
      EXPECT_TRUE(all_close(back->apply_weight(W, 0.7), a->apply_weight(W, 0.7), 1e-4, 1e-4, "round trip " + o.algo()));
    }
}

TEST(LowRank, ZeroAtInit) {
  for (auto algo : {"lora", "loha", "lokr", "dylora"}) {
    auto a = find_algorithm(algo).create(LayerSpec::conv(8, 8, {3, 3}), AdapterOptions().algo(algo).rank(4));
    auto W = torch::randn({8, 8, 3, 3});
    EXPECT_TRUE(all_close(a->apply_weight(W, 1.0), W, 0, 0, algo));
  }
}

TEST(LowRank, Malformed) {
  auto layer = LayerSpec::linear(4, 3);
  EXPECT_THROW(load_adapter("m", {{"lora_up.weight", torch::zeros({3, 2})}}, layer), KeyError);
  EXPECT_THROW(load_adapter("m", {{"lora_up.weight", torch::zeros({3, 2})}, {"lora_down.weight", torch::zeros({1, 4})}}, layer), ShapeError);
  EXPECT_THROW(load_adapter("m", {{"lora_up.weight", torch::zeros({3, 2})}, {"lora_down.weight", torch::zeros({2, 5})}}, layer), ShapeError);
  EXPECT_THROW(load_adapter("m", {{"lora_up.weight", torch::zeros({3, 2})}, {"lora_down.weight", torch::zeros({2, 4})}, {"foo", torch::zeros({1})}}, layer), KeyError);
  EXPECT_THROW(find_algorithm("dylora").create(layer, AdapterOptions().rank(6).block_size(4)), OptionError);
}

}  // namespace low_rank_test
