// Worked examples of docs/format.md#loha and #lokr, docs/training.md#factorization tables, bypass == rebuild.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/factorization.hpp"
#include "lycoris/functional/lokr.hpp"
#include "test_util.hpp"

namespace lowrank_examples_test {

using namespace lycoris;
using lycoris::test::all_close;
using P = std::pair<int64_t, int64_t>;

TEST(Factorization, Table) {
  using functional::factorization;
  EXPECT_EQ(factorization(64, -1), P(8, 8));
  EXPECT_EQ(factorization(360, 16), P(15, 24));
  EXPECT_EQ(factorization(320, 32), P(10, 32));
  EXPECT_EQ(factorization(10240, -1), P(80, 128));
  EXPECT_EQ(factorization(64, 64), P(1, 64));
  EXPECT_EQ(factorization(250, 8), P(5, 50));
  auto p = functional::power2factorization(320, 16);
  ASSERT_TRUE(p);
  EXPECT_EQ(*p, P(10, 32));
  EXPECT_FALSE(functional::power2factorization(320, 4));
  EXPECT_EQ(*functional::power2factorization(96, 8), P(6, 16));
}

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

TEST(LoKr, WorkedExamples) {
  TensorMap t{{"lokr_w1", torch::tensor({1.f, 2.f, 0.f, 1.f}).view({2, 2})},
              {"lokr_w2", torch::tensor({1.f, -1.f, 2.f, 0.5f}).view({2, 2})},
              {"alpha", torch::tensor(7.f)}};
  auto a = load_adapter("m", t, LayerSpec::linear(4, 4));
  auto dw = a->apply_weight(torch::zeros({4, 4}), 1.0);
  auto expect = torch::tensor({1.f, -1.f, 2.f, -2.f, 2.f, .5f, 4.f, 1.f, 0.f, 0.f, 1.f, -1.f, 0.f, 0.f, 2.f, .5f}).view({4, 4});
  EXPECT_TRUE(all_close(dw, expect, 1e-6, 0));
  TensorMap t8{{"lokr_w1", torch::tensor({1.f, 2.f, 0.f, 1.f}).view({2, 2})},
               {"lokr_w2_a", torch::tensor({1.f, 2.f, 0.f, 1.f}).view({4, 1})},
               {"lokr_w2_b", torch::tensor({1.f, -1.f, 0.f, 2.f}).view({1, 4})},
               {"alpha", torch::tensor(0.5f)}};
  auto b = load_adapter("m", t8, LayerSpec::linear(8, 8));
  auto d8 = b->apply_weight(torch::zeros({8, 8}), 1.0);
  EXPECT_TRUE(all_close(d8[0], torch::tensor({.5f, -.5f, 0.f, 1.f, 1.f, -1.f, 0.f, 2.f}), 1e-6, 0));
  EXPECT_TRUE(all_close(d8[4], torch::tensor({0.f, 0.f, 0.f, 0.f, .5f, -.5f, 0.f, 1.f}), 1e-6, 0));
}

TEST(LoKr, LayoutExamples) {
  auto L = functional::lokr::choose_layout(LayerSpec::linear(48, 64), 2, 2, false, false, true, false);
  EXPECT_EQ(L.a, 32); EXPECT_EQ(L.c, 2); EXPECT_EQ(L.p, 2); EXPECT_EQ(L.q, 24); EXPECT_TRUE(L.w2_low_rank);
  auto C = functional::lokr::choose_layout(LayerSpec::conv(48, 64, {3, 3}), 2, -1, false, false, false, true);
  EXPECT_EQ(C.a, 8); EXPECT_EQ(C.c, 6); EXPECT_TRUE(C.tucker);
}

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

}  // namespace lowrank_examples_test
