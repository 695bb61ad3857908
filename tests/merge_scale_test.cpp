// tools::merge_tensor (the compute stage of `lycoris merge`): the in-place, row-chunked path must give
// apply_weight's result for every algorithm and variant — alone, chained, at several multipliers, into
// fp32 / fp16 / bf16 outputs and in place over the input buffer — and must report NaN/Inf.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/modules/lora.hpp"
#include "lycoris/tools/merge.hpp"
#include "test_util.hpp"

namespace merge_scale_test {

using lycoris::AdapterOptions;
using lycoris::AdapterPtr;
using lycoris::LayerSpec;
using lycoris::tools::merge_tensor;
using lycoris::tools::MergeStep;

struct Variant {
  std::string name;
  AdapterOptions options;
};

std::vector<Variant> variants() {
  auto o = [](const char* algo) { return AdapterOptions().algo(algo).rank(4).alpha(3); };
  return {{"lora", o("lora")},
          {"lora_tucker", o("lora").tucker(true)},
          {"lora_dora", o("lora").dora(true)},
          {"loha", o("loha")},
          {"loha_tucker", o("loha").tucker(true)},
          {"lokr", o("lokr")},
          {"lokr_w1_decomposed", o("lokr").decompose_both(true).factor(4)},
          {"lokr_full", o("lokr").full_matrix(true).factor(4)},
          {"lokr_tucker", o("lokr").tucker(true).factor(4)},
          {"dylora", o("dylora")},
          {"ia3", o("ia3")},
          {"full", o("full")},
          {"diag_oft", o("diag-oft").rank(4)},
          {"boft", o("boft").rank(4)},
          {"glora", o("glora")},
          {"glokr", o("glokr")}};
}

// Layers big enough for several row chunks (64 Ki elements each): 384 rows of 512, and a 3×3 conv.
std::vector<LayerSpec> layers() {
  return {LayerSpec::linear(512, 384), LayerSpec::conv(48, 64, {3, 3}, {1, 1}, {1, 1})};
}

// nullptr when the algorithm cannot wrap the layer with these options.
AdapterPtr make(const Variant& v, const LayerSpec& layer, const torch::Tensor& W) {
  const auto& algo = lycoris::find_algorithm(v.options.algo());
  if (algo.supports && !algo.supports(layer)) return nullptr;
  AdapterPtr a;
  try {
    a = algo.create(layer, v.options);
  } catch (const lycoris::OptionError&) {
    return nullptr;
  }
  torch::NoGradGuard g;
  if (auto* lr = dynamic_cast<lycoris::LowRankAdapter*>(a.get()); lr && lr->dora_scale.defined()) lr->init_dora(W);
  for (auto& p : a->parameters()) p.add_(torch::randn_like(p) * 0.05);
  a->eval();
  return a;
}

torch::Tensor reference(torch::Tensor W, const std::vector<MergeStep>& steps) {
  for (const auto& s : steps) W = s.adapter->apply_weight(W, s.m);
  return W;
}

TEST(MergeScale, InPlaceEqualsApplyWeightForEveryAlgorithm) {
  torch::manual_seed(7);
  torch::NoGradGuard g;
  int checked = 0;
  for (const auto& layer : layers())
    for (const auto& v : variants()) {
      auto W16 = (torch::randn(layer.weight_shape()) * 0.05).to(torch::kFloat16);
      auto a = make(v, layer, W16.to(torch::kFloat32));
      if (!a) continue;
      const std::string what = v.name + " on " + layer.describe();
      for (double m : {1.0, 0.7, -1.3}) {
        std::vector<MergeStep> steps{{a.get(), m, false}};
        auto expected = reference(W16.to(torch::kFloat32), steps);
        // fp32 output: the same fp32 math up to rounding order
        auto out32 = torch::empty(W16.sizes(), torch::kFloat32);
        ASSERT_TRUE(merge_tensor(W16, out32, steps)) << what;
        EXPECT_TRUE(lycoris::test::all_close(out32, expected, 1e-6, 1e-5, what + " fp32 m=" + std::to_string(m)));
        // in place over an fp16 buffer: one rounding of that result (at most one fp16 ulp apart)
        auto buf = W16.clone();
        ASSERT_TRUE(merge_tensor(buf, buf, steps)) << what;
        EXPECT_TRUE(lycoris::test::all_close(buf.to(torch::kFloat32), expected.to(torch::kFloat16).to(torch::kFloat32),
                                    6e-8 /* fp16 subnormal step */, 1.0 / 1024, what + " in place fp16 m=" + std::to_string(m)));
        EXPECT_LE((buf.to(torch::kFloat32) != expected.to(torch::kFloat16).to(torch::kFloat32)).sum().item<int64_t>(),
                  W16.numel() / 100)
            << what << ": more than 1% of the fp16 roundings differ";
      }
      // fp64 base: fp64 compute
      auto W64 = W16.to(torch::kFloat64);
      std::vector<MergeStep> steps{{a.get(), 0.5, false}};
      auto out64 = torch::empty_like(W64);
      ASSERT_TRUE(merge_tensor(W64, out64, steps)) << what;
      EXPECT_TRUE(lycoris::test::all_close(out64, reference(W64, steps), 1e-6, 1e-5, what + " fp64"));
      ++checked;
    }
  EXPECT_GE(checked, 20);
}

TEST(MergeScale, ChainedAdaptersApplyInOrder) {
  torch::manual_seed(8);
  torch::NoGradGuard g;
  for (const auto& layer : layers()) {
    auto W = torch::randn(layer.weight_shape()) * 0.05;
    const auto vs = variants();
    // all row kernels (LoRA, LoHa, LoKr) — the chunked path — and a mix with OFT and DoRA (whole path)
    for (const auto& names : std::vector<std::vector<std::string>>{{"lora", "loha", "lokr"},
                                                                  {"lokr", "diag_oft", "lora_dora", "loha"}}) {
      std::vector<AdapterPtr> keep;
      std::vector<MergeStep> steps;
      double m = 0.9;
      for (const auto& n : names)
        for (const auto& v : vs)
          if (v.name == n)
            if (auto a = make(v, layer, W)) {
              keep.push_back(a);
              steps.push_back({a.get(), m, false});
              m -= 0.4;
            }
      ASSERT_GE(steps.size(), 2u);
      auto out = torch::empty_like(W);
      ASSERT_TRUE(merge_tensor(W, out, steps));
      EXPECT_TRUE(lycoris::test::all_close(out, reference(W, steps), 1e-6, 1e-5, "chain on " + layer.describe()));
    }
  }
}

TEST(MergeScale, BiasStepsAndNonFiniteResults) {
  torch::manual_seed(9);
  torch::NoGradGuard g;
  auto layer = LayerSpec::linear(16, 8);
  auto a = lycoris::find_algorithm("full").create(layer, AdapterOptions().algo("full"));
  for (auto& p : a->parameters()) p.copy_(torch::randn_like(p));
  a->eval();
  auto b = torch::randn({8});
  auto out = torch::empty_like(b);
  ASSERT_TRUE(merge_tensor(b, out, {{a.get(), 0.5, true}}));
  EXPECT_TRUE(lycoris::test::all_close(out, a->apply_bias(b, 0.5), 1e-6, 1e-6, "full bias"));

  auto lora = lycoris::find_algorithm("lora").create(LayerSpec::linear(512, 384), AdapterOptions().algo("lora").rank(4));
  for (auto& p : lora->parameters()) p.copy_(torch::randn_like(p));
  lora->eval();
  auto W = torch::randn({384, 512});
  auto o = torch::empty_like(W);
  EXPECT_TRUE(merge_tensor(W, o, {{lora.get(), 1.0, false}}));
  W[300][7] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(merge_tensor(W, o, {{lora.get(), 1.0, false}})) << "NaN in the last chunk goes unreported";
  W[300][7] = 0.0;
  EXPECT_FALSE(merge_tensor(W, o, {{lora.get(), 1e39, false}})) << "Inf from the delta goes unreported";
}

}  // namespace merge_scale_test
