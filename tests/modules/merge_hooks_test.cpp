// What an adapter tells a merge (AdapterImpl::row_kernel, additive_delta, changes_bias), per algorithm:
// which ones offer a row kernel or an additive ΔW, and when they must not (training, DoRA not yet
// initialised, ΔW that depends on W).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "lycoris/algorithms.hpp"
#include "lycoris/layer.hpp"
#include "lycoris/modules/full.hpp"
#include "lycoris/modules/norm.hpp"
#include "test_util.hpp"

namespace merge_hooks_test {

using namespace lycoris;

AdapterPtr make(const std::string& algo, const LayerSpec& layer, AdapterOptions o = AdapterOptions()) {
  auto a = find_algorithm(algo).create(layer, o.algo(algo).rank(4));
  a->eval();
  return a;
}

TEST(MergeHooks, WhichAlgorithmsOfferWhat) {
  const auto layer = LayerSpec::linear(16, 16);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  torch::NoGradGuard no_grad;
  for (const std::string algo : {"lora", "loha", "lokr", "ia3"})
    EXPECT_NE(make(algo, layer)->row_kernel(0.5, f32, {16, 16}), nullptr) << algo;
  for (const std::string algo : {"dylora", "full", "glora", "glokr", "diag-oft", "boft"})
    EXPECT_EQ(make(algo, layer)->row_kernel(0.5, f32, {16, 16}), nullptr) << algo;
  for (const std::string algo : {"lora", "loha", "lokr", "dylora"})
    EXPECT_TRUE(make(algo, layer)->additive_delta().defined()) << algo;
  for (const std::string algo : {"glokr", "ia3", "full", "glora", "diag-oft", "boft"})
    EXPECT_FALSE(make(algo, layer)->additive_delta().defined()) << algo;
}

TEST(MergeHooks, NoKernelInTrainingOrForAnUninitialisedDoRA) {
  const auto layer = LayerSpec::linear(16, 16);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  torch::NoGradGuard no_grad;
  auto lora = make("lora", layer);
  lora->train();
  EXPECT_EQ(lora->row_kernel(1.0, f32, {16, 16}), nullptr);
  EXPECT_FALSE(lora->additive_delta().defined());
  // a fresh DoRA adapter takes its scale from the first W it sees: apply_weight does that, a kernel cannot
  auto dora = make("lora", layer, AdapterOptions().dora(true));
  EXPECT_EQ(dora->row_kernel(1.0, f32, {16, 16}), nullptr);
  EXPECT_FALSE(dora->additive_delta().defined());
  dora->apply_weight(torch::randn({16, 16}), 1.0);
  EXPECT_NE(dora->row_kernel(1.0, f32, {16, 16}), nullptr);
  // factors in another dtype: no kernel (the caller gets apply_weight's rounding)
  EXPECT_EQ(make("lora", layer)->row_kernel(1.0, f32.dtype(torch::kFloat64), {16, 16}), nullptr);
}

TEST(MergeHooks, ChangesBias) {
  torch::NoGradGuard no_grad;
  const auto with_bias = LayerSpec::linear(4, 3, true), without = LayerSpec::linear(4, 3, false);
  EXPECT_TRUE(make("full", with_bias)->changes_bias());
  EXPECT_FALSE(make("full", without)->changes_bias());
  EXPECT_FALSE(std::make_shared<FullImpl>(with_bias, torch::zeros({3, 4}), torch::Tensor())->changes_bias());
  EXPECT_TRUE(std::make_shared<NormImpl>(LayerSpec::layer_norm(5), torch::zeros({5}), torch::zeros({5}))->changes_bias());
  EXPECT_FALSE(std::make_shared<NormImpl>(LayerSpec::layer_norm(5), torch::zeros({5}), torch::Tensor())->changes_bias());
  for (const std::string algo : {"lora", "loha", "lokr", "ia3", "glora", "diag-oft"})
    EXPECT_FALSE(make(algo, with_bias)->changes_bias()) << algo;
}

}  // namespace merge_hooks_test
