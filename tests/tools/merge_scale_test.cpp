// tools::merge_tensor (the compute stage of `lycoris merge`): the in-place, row-chunked path must give
// apply_weight's result for every algorithm and variant — alone, chained, at several multipliers, into
// fp32 / fp16 / bf16 outputs and in place over the input buffer — and must report NaN/Inf.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/modules/ia3.hpp"
#include "lycoris/modules/lora.hpp"
#include "lycoris/tools/merge.hpp"
#include "test_util.hpp"
#include "tools/merge/merge_tensor.hpp"

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

// ---------------------------------------------------------------- DoRA and (IA)^3 fast paths
//
// DoRA per output row is finished chunk by chunk; DoRA per input column needs a first pass over every
// row (Σ V² per column) before the writing pass; (IA)^3 is a per-row or per-column scale. Each must give
// apply_weight's result within a few fp32 ulps (IA3: the same fp32 ops, so exactly).

std::vector<Variant> dora_ia3_variants() {
  auto o = [](const char* algo) { return AdapterOptions().algo(algo).rank(4).alpha(3); };
  return {{"lora_dora_out", o("lora").dora(true).wd_on_out(true)},
          {"lora_dora_in", o("lora").dora(true).wd_on_out(false)},
          {"loha_dora_out", o("loha").dora(true).wd_on_out(true)},
          {"loha_dora_in", o("loha").dora(true).wd_on_out(false)},
          {"lokr_dora_in", o("lokr").dora(true).wd_on_out(false).factor(4)},
          {"ia3_out", o("ia3").train_on_input(false)},
          {"ia3_in", o("ia3").train_on_input(true)}};
}

// |a − b| ≤ ulps · ε_fp32 · (|b| + max|b|): a few fp32 roundings of the tensor's largest values (the sums of
// the norms round in another order, and W + ΔW cancels, so small elements carry the error of large terms).
::testing::AssertionResult within_ulps(const torch::Tensor& a, const torch::Tensor& b, double ulps, const std::string& what) {
  const double eps = std::numeric_limits<float>::epsilon();
  auto bound = (b.abs() + b.abs().max()) * (ulps * eps);
  auto excess = ((a - b).abs() - bound).max().item<double>();
  if (excess <= 0 && torch::isfinite(a).all().item<bool>()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": max |a − b| = " << (a - b).abs().max().item<double>()
                                       << " exceeds " << ulps << " ulps (by " << excess << ")";
}

TEST(MergeScaleDoraIA3, ChunkedEqualsApplyWeight) {
  torch::manual_seed(11);
  torch::NoGradGuard g;
  int checked = 0;
  for (const auto& layer : layers())
    for (const auto& v : dora_ia3_variants()) {
      auto W16 = (torch::randn(layer.weight_shape()) * 0.05).to(torch::kFloat16);
      auto a = make(v, layer, W16.to(torch::kFloat32));
      ASSERT_TRUE(a) << v.name;
      if (auto* lr = dynamic_cast<lycoris::LowRankAdapter*>(a.get())) {
        ASSERT_TRUE(lr->dora_scale.defined()) << v.name;
        EXPECT_EQ(lr->dora_scale.size(0) != 1, v.options.wd_on_out()) << v.name << ": wrong DoRA axis";
      } else {
        auto* ia3 = dynamic_cast<lycoris::IA3Impl*>(a.get());
        ASSERT_TRUE(ia3) << v.name;
        EXPECT_EQ(ia3->on_input(), v.options.train_on_input()) << v.name;
        ia3->weight.normal_(0, 0.5);  // far from 0: a real scale
      }
      const std::string what = v.name + " on " + layer.describe();
      const bool ia3 = v.name.rfind("ia3", 0) == 0;
      for (double m : {1.0, 0.7}) {
        std::vector<MergeStep> steps{{a.get(), m, false}};
        auto expected = reference(W16.to(torch::kFloat32), steps);
        // the fast path is only worth something when the result actually changes W
        ASSERT_GT((expected - W16.to(torch::kFloat32)).abs().max().item<double>(), 1e-3) << what;
        auto out32 = torch::empty(W16.sizes(), torch::kFloat32);
        ASSERT_TRUE(merge_tensor(W16, out32, steps)) << what;
        if (ia3)
          EXPECT_TRUE(torch::equal(out32, expected)) << what << " m=" << m << ": not the same fp32 ops";
        else
          EXPECT_TRUE(within_ulps(out32, expected, 4, what + " m=" + std::to_string(m)));
        // in place over the fp16 input (column DoRA: the first pass must not have written it)
        auto buf = W16.clone();
        ASSERT_TRUE(merge_tensor(buf, buf, steps)) << what;
        auto want16 = expected.to(torch::kFloat16).to(torch::kFloat32);
        EXPECT_TRUE(lycoris::test::all_close(buf.to(torch::kFloat32), want16, 6e-8, 1.0 / 1024, what + " in place fp16"));
        EXPECT_LE((buf.to(torch::kFloat32) != want16).sum().item<int64_t>(), W16.numel() / 100) << what;
      }
      // fp64 base: fp64 compute, fp64 ε
      auto W64 = W16.to(torch::kFloat64);
      std::vector<MergeStep> steps{{a.get(), 0.7, false}};
      auto out64 = torch::empty_like(W64);
      ASSERT_TRUE(merge_tensor(W64, out64, steps)) << what;
      EXPECT_TRUE(lycoris::test::all_close(out64, reference(W64, steps), 1e-12, 1e-12, what + " fp64"));
      ++checked;
    }
  EXPECT_EQ(checked, 14);
}

// Several column-norm DoRA steps after row steps: one pass per column step, each seeing the result of
// the steps before it.
TEST(MergeScaleDoraIA3, ChainOfColumnAndRowSteps) {
  torch::manual_seed(12);
  torch::NoGradGuard g;
  const auto vs = dora_ia3_variants();
  auto find = [&](const std::string& n) {
    for (const auto& v : vs)
      if (v.name == n) return v;
    return vs.front();
  };
  for (const auto& layer : layers()) {
    auto W = torch::randn(layer.weight_shape()) * 0.05;
    std::vector<AdapterPtr> keep;
    std::vector<MergeStep> steps;
    double m = 1.0;
    for (const auto* n : {"ia3_in", "lora_dora_in", "loha_dora_out", "ia3_out", "loha_dora_in"}) {
      keep.push_back(make(find(n), layer, W));
      ASSERT_TRUE(keep.back()) << n;
      steps.push_back({keep.back().get(), m, false});
      m -= 0.15;
    }
    auto out = torch::empty_like(W);
    ASSERT_TRUE(merge_tensor(W, out, steps));
    EXPECT_TRUE(within_ulps(out, reference(W, steps), 8, "chain on " + layer.describe()));
  }
}

TEST(MergeScaleDoraIA3, NonFiniteDetected) {
  torch::manual_seed(13);
  torch::NoGradGuard g;
  for (const auto& layer : layers())
    for (const auto& v : dora_ia3_variants()) {
      auto W = torch::randn(layer.weight_shape()) * 0.05;
      auto a = make(v, layer, W);
      auto o = torch::empty_like(W);
      ASSERT_TRUE(merge_tensor(W, o, {{a.get(), 0.7, false}})) << v.name;
      auto bad = W.clone();
      bad.view({bad.size(0), -1})[bad.size(0) - 1][5] = std::numeric_limits<float>::quiet_NaN();
      EXPECT_FALSE(merge_tensor(bad, o, {{a.get(), 0.7, false}})) << v.name << ": NaN in the last row unreported";
      EXPECT_FALSE(merge_tensor(bad, bad, {{a.get(), 1.0, false}})) << v.name << ": NaN unreported in place";
    }
}

// The chunk conversions (fp16 ↔ fp32, vectorised where the CPU can) round exactly as torch does: an
// identity step ((IA)^3 with v = 0) must give x.to(dtype) bit for bit, over normal, subnormal, tie and
// near-overflow values.
TEST(MergeScaleDoraIA3, ConversionsRoundAsTorch) {
  torch::manual_seed(15);
  torch::NoGradGuard g;
  auto layer = LayerSpec::linear(512, 384);
  auto a = lycoris::find_algorithm("ia3").create(layer, AdapterOptions().algo("ia3"));
  a->eval();
  auto x = torch::randn({384, 512}) * torch::pow(10.0, torch::rand({384, 512}) * 13 - 9);  // 1e-9 … 1e4
  x.view({-1}).narrow(0, 0, 64).copy_(torch::arange(64) * (1.0 / (1 << 24)) + 1.0 / (1 << 11));  // ties
  x[5][7] = 65504;
  x[5][8] = -65519;  // rounds to the largest half
  std::vector<MergeStep> steps{{a.get(), 0.7, false}};
  auto out16 = torch::empty(x.sizes(), torch::kFloat16);
  ASSERT_TRUE(merge_tensor(x, out16, steps));
  EXPECT_TRUE(torch::equal(out16, x.to(torch::kFloat16))) << "fp32 → fp16 rounding differs from torch's";
  auto x16 = x.to(torch::kFloat16);
  auto out32 = torch::empty(x.sizes(), torch::kFloat32);
  ASSERT_TRUE(merge_tensor(x16, out32, steps));
  EXPECT_TRUE(torch::equal(out32, x16.to(torch::kFloat32))) << "fp16 → fp32 differs from torch's";
  auto outbf = torch::empty(x.sizes(), torch::kBFloat16);
  ASSERT_TRUE(merge_tensor(x16, outbf, steps));
  EXPECT_TRUE(torch::equal(outbf, x16.to(torch::kFloat32).to(torch::kBFloat16)));
}

// Through tools::merge: the NaN produced by a DoRA / (IA)^3 module is reported naming the tensor and module.
TEST(MergeScaleDoraIA3, NaNNamesTheModule) {
  torch::manual_seed(14);
  namespace io = lycoris::io;
  const auto dir = lycoris::test::temp_dir("merge-scale-nan");
  const auto base = dir + "/base.safetensors";
  io::save_file(base, {{"net.proj.weight", torch::randn({8, 6}).to(torch::kFloat16)}, {"net.proj.bias", torch::randn({8})}});
  const std::string mod = "lycoris_net_proj";
  auto ds_in = torch::rand({1, 6}) + 1;
  ds_in[0][2] = std::numeric_limits<float>::quiet_NaN();
  auto v = torch::randn({8});
  v[7] = std::numeric_limits<float>::infinity();
  const std::vector<std::pair<std::string, std::vector<std::pair<std::string, torch::Tensor>>>> cases = {
      {"dora_in",
       {{mod + ".alpha", torch::tensor(2.0)},
        {mod + ".lora_up.weight", torch::randn({8, 2})},
        {mod + ".lora_down.weight", torch::randn({2, 6})},
        {mod + ".dora_scale", ds_in}}},
      {"ia3", {{mod + ".weight", v}, {mod + ".on_input", torch::tensor(int64_t{0})}}}};
  for (const auto& [name, tensors] : cases) {
    const auto path = dir + "/" + name + ".safetensors";
    io::save_file(path, tensors);
    lycoris::tools::MergeOptions opt;
    opt.adapters = {{path, 1.0}};
    try {
      lycoris::tools::merge(base, dir + "/out.safetensors", opt);
      ADD_FAILURE() << name << ": merged a non-finite result";
    } catch (const lycoris::Error& e) {
      const std::string msg = e.what();
      for (const auto* needle : {"net.proj.weight", "NaN", "lycoris_net_proj"})
        EXPECT_NE(msg.find(needle), std::string::npos) << name << ": " << msg << " lacks " << needle;
    }
  }
}

// The two streaming paths of merge — the zero-copy rewriter (same dtypes) and the buffer pool (taken when
// the rewriter's window cannot be created, here under a file-size limit below the window) — write the
// same tensors.
TEST(MergeScalePaths, RewriterAndBufferPoolAgree) {
  torch::manual_seed(15);
  namespace io = lycoris::io;
  const auto dir = lycoris::test::temp_dir("merge-scale-paths");
  const auto base = dir + "/base.safetensors", adapter = dir + "/adapter.safetensors";
  io::save_file(base, {{"net.a.weight", torch::randn({64, 48}).to(torch::kFloat16)},
                       {"net.a.bias", torch::randn({64}).to(torch::kFloat16)},
                       {"net.b.weight", torch::randn({32, 64})}});
  io::save_file(adapter, {{"lycoris_net_a.alpha", torch::tensor(4.0)},
                          {"lycoris_net_a.lora_up.weight", torch::randn({64, 4})},
                          {"lycoris_net_a.lora_down.weight", torch::randn({4, 48})}});
  lycoris::tools::MergeOptions opt;
  opt.adapters = {{adapter, 0.7}};
  lycoris::tools::merge(base, dir + "/rewriter.safetensors", opt);
  // the window (a memfd of max_bytes_in_flight, ≥ 64 MB by default) cannot be sized
  auto limit = std::make_unique<lycoris::test::FileSizeLimit>(32ull << 20);
  ASSERT_TRUE(limit->ok());
  lycoris::tools::MergeReport report;
  try {
    report = lycoris::tools::merge(base, dir + "/pool.safetensors", opt);
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
  }
  limit.reset();
  EXPECT_EQ(report.modified, 2u);  // net.a weight and bias (a LoRA leaves the bias as it is)
  auto a = io::SafetensorsFile::open(dir + "/rewriter.safetensors"), b = io::SafetensorsFile::open(dir + "/pool.safetensors");
  for (const auto* key : {"net.a.weight", "net.a.bias", "net.b.weight"})
    EXPECT_TRUE(torch::equal(a.tensor(key), b.tensor(key))) << key;
  EXPECT_TRUE(torch::equal(a.tensor("net.b.weight"), io::SafetensorsFile::open(base).tensor("net.b.weight")));
  EXPECT_FALSE(torch::equal(a.tensor("net.a.weight"), io::SafetensorsFile::open(base).tensor("net.a.weight")));
  // the rewriter pads its header to keep the base's data offset modulo 4096; the buffer pool does not
  EXPECT_EQ(a.header().data_start % 4096, io::SafetensorsFile::open(base).header().data_start % 4096);
  EXPECT_NE(b.header().data_start % 4096, io::SafetensorsFile::open(base).header().data_start % 4096);
}

}  // namespace merge_scale_test
