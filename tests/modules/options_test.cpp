// Construction-time behaviour of every algorithm (docs/training.md#initialisation): invalid options rejected with an
// OptionError naming the option, ignored options warned about, the dropout family (training only; module
// dropout statistics; rank-dropout masks and their mean rescale), the reference initialisation (ΔW = 0,
// DoRA magnitude from the host weight, Full's zero diff).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <c10/util/Exception.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/modules/dylora.hpp"
#include "lycoris/modules/full.hpp"
#include "lycoris/modules/lora.hpp"
#include "lycoris/network.hpp"
#include "lycoris/preset.hpp"
#include "lycoris/io/safetensors.hpp"
#include <nlohmann/json.hpp>
#include "test_util.hpp"

namespace options_test {

using namespace lycoris;
using lycoris::test::all_close;

const LayerSpec kLinear = LayerSpec::linear(6, 8);
const LayerSpec kConv = LayerSpec::conv(4, 8, {3, 3}, {1, 1}, {1, 1});
const LayerSpec kNorm = LayerSpec::layer_norm(8);

// The host each algorithm is exercised on.
LayerSpec host_for(const std::string& algo) { return algo == "norm" ? kNorm : kLinear; }

// Options valid for the algorithm (block size 2 for DyLoRA so that rank 4 has 2 blocks).
AdapterOptions base_options(const std::string& algo) {
  return AdapterOptions().algo(algo).rank(algo == "lokr" || algo == "glokr" ? 1 : 4).alpha(2).block_size(algo == "dylora" ? 2 : 4);
}

torch::Tensor input_for(const LayerSpec& l) {
  if (l.kind == LayerKind::LayerNorm) return torch::randn({5, l.out_features});
  if (!l.is_conv()) return torch::randn({5, l.in_features});
  return torch::randn({2, l.in_features, 5, 5});
}

void perturb(AdapterImpl& a, const torch::Tensor& W) {
  torch::NoGradGuard g;
  const bool training = a.is_training();
  a.eval();                // no dropout draws: twins consume the same random numbers
  a.apply_weight(W, 1.0);  // DoRA magnitude from W
  a.train(training);
  for (auto& p : a.parameters()) p.add_(torch::randn_like(p) * 0.5);
}

// Expects OptionError whose message contains every one of `needles`.
void expect_option_error(const std::function<void()>& f, const std::vector<std::string>& needles,
                         const std::string& what) {
  try {
    f();
    ADD_FAILURE() << what << ": no OptionError";
  } catch (const OptionError& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << what << ": '" << msg << "' lacks " << n;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": expected OptionError, got " << e.what();
  }
}

// Collects TORCH_WARN messages while alive.
struct WarningCollector : c10::WarningHandler {
  std::vector<std::string> messages;
  c10::Warning::WarningHandlerGuard guard{this};
  void process(const c10::SourceLocation&, const std::string& msg, const bool) override { messages.push_back(msg); }
};

// ---------------------------------------------------------------- invalid options (docs/training.md#option-checks)

TEST(AdapterOptionErrors, EveryAlgorithmRejectsBadProbabilitiesAndLayers) {
  for (const auto& a : algorithms()) {
    const auto l = host_for(a.name);
    const auto o = base_options(a.name);
    EXPECT_NO_THROW(a.create(l, o)) << a.name;
    expect_option_error([&] { a.create(l, AdapterOptions(o).dropout(-0.1)); }, {a.name, "dropout", "[0, 1]"},
                        a.name + " dropout");
    expect_option_error([&] { a.create(l, AdapterOptions(o).rank_dropout(1.5)); }, {a.name, "rank_dropout"},
                        a.name + " rank_dropout");
    expect_option_error([&] { a.create(l, AdapterOptions(o).module_dropout(2.0)); }, {a.name, "module_dropout"},
                        a.name + " module_dropout");
    if (a.name == "norm") {
      expect_option_error([&] { a.create(kLinear, o); }, {"norm", "Linear", "not a LayerNorm or GroupNorm"}, "norm on Linear");
    } else {
      expect_option_error([&] { a.create(kNorm, o); }, {a.name, "LayerNorm", "not a Linear or Conv"}, a.name + " on LayerNorm");
      expect_option_error([&] { a.create(LayerSpec::conv(4, 8, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 2), o); },
                          {a.name, "groups"}, a.name + " grouped conv");
    }
  }
}

TEST(AdapterOptionErrors, AlgorithmSpecificRejections) {
  for (auto algo : {"lora", "loha", "lokr", "glokr", "dylora", "glora"})
    expect_option_error([&] { find_algorithm(algo).create(kLinear, base_options(algo).rank(0)); }, {algo, "rank"},
                        std::string(algo) + " rank 0");
  // DyLoRA: lora_dim a multiple of block_size (the reference asserts)
  expect_option_error([] { find_algorithm("dylora").create(kLinear, base_options("dylora").rank(6).block_size(4)); },
                      {"dylora", "block_size 4", "rank 6"}, "dylora rank % block_size");
  expect_option_error([] { find_algorithm("dylora").create(kLinear, base_options("dylora").block_size(0)); },
                      {"dylora", "block_size"}, "dylora block_size 0");
  // BOFT: power2factorization(12, 4) finds nothing (docs/loaders.md#q22-boft-layout)
  expect_option_error([] { find_algorithm("boft").create(LayerSpec::linear(6, 12), base_options("boft").rank(4)); },
                      {"boft", "rank 4", "butterfly"}, "boft layout");
  for (auto algo : {"diag-oft", "boft"}) {
    expect_option_error([&] { find_algorithm(algo).create(kLinear, base_options(algo).rank(0)); }, {algo, "rank"},
                        std::string(algo) + " rank 0");
    expect_option_error([&] { find_algorithm(algo).create(kLinear, base_options(algo).rank(-3)); }, {algo, "rank"},
                        std::string(algo) + " rank -3");
    expect_option_error([&] { find_algorithm(algo).create(kLinear, base_options(algo).constraint(-1)); },
                        {algo, "constraint"}, std::string(algo) + " constraint");
  }
  // Full has no bypass mode (docs/training.md#algo-full: explicit bypass_mode=True is an error)
  expect_option_error([] { find_algorithm("full").create(kLinear, base_options("full").bypass_mode(true)); },
                      {"full", "bypass_mode"}, "full bypass");
  // bypass_mode is fine for every other algorithm
  for (const auto& a : algorithms())
    if (a.name != "full") EXPECT_NO_THROW(a.create(host_for(a.name), base_options(a.name).bypass_mode(true))) << a.name;
}

TEST(AdapterOptionErrors, IgnoredOptionsAreWarnedAbout) {
  WarningCollector w;
  find_algorithm("ia3").create(kLinear, base_options("ia3").factor(5).block_size(4));
  bool factor = false;
  for (const auto& m : w.messages) factor = factor || (m.find("ia3") != std::string::npos && m.find("factor") != std::string::npos);
  EXPECT_TRUE(factor) << "no warning about ia3 ignoring factor";
  w.messages.clear();
  // options the algorithm uses: no warning
  find_algorithm("lokr").create(kLinear, base_options("lokr").factor(2).decompose_both(true).dora(true));
  find_algorithm("diag-oft").create(kLinear, base_options("diag-oft").constraint(0.5).rescaled(true));
  EXPECT_TRUE(w.messages.empty()) << w.messages.front();
}

// ---------------------------------------------------------------- initialisation (docs/training.md#initialisation)

TEST(AdapterInit, EveryAlgorithmStartsAtTheHostWeight) {
  torch::manual_seed(1);
  for (const auto& a : algorithms()) {
    for (const auto& l : a.name == "norm" ? std::vector<LayerSpec>{kNorm, LayerSpec::group_norm(2, 8)}
                                          : std::vector<LayerSpec>{kLinear, kConv}) {
      auto adapter = a.create(l, base_options(a.name));
      auto W = torch::randn(l.weight_shape()), b = torch::randn({l.out_features});
      auto x = l.kind == LayerKind::GroupNorm ? torch::randn({2, 8, 5}) : input_for(l);
      torch::NoGradGuard g;
      EXPECT_TRUE(torch::equal(adapter->apply_weight(W, 1.0), W)) << a.name << " " << l.describe();
      EXPECT_TRUE(torch::equal(adapter->apply_bias(b, 1.0), b)) << a.name << " " << l.describe();
      EXPECT_TRUE(all_close(adapter->bypass_forward(x, W, b, 1.0), layer_forward(x, l, W, b), 1e-6, 1e-6,
                            a.name + " bypass at init " + l.describe()));
    }
  }
}

TEST(AdapterInit, DoRAMagnitudeIsTheHostWeightNorm) {
  torch::manual_seed(2);
  for (auto algo : {"lora", "loha", "lokr", "glokr"})
    for (const auto& l : {kLinear, kConv})
      for (bool on_out : {true, false}) {
        const std::string what = std::string(algo) + " " + l.describe() + (on_out ? " out" : " in");
        auto a = std::dynamic_pointer_cast<LowRankAdapter>(
            find_algorithm(algo).create(l, base_options(algo).dora(true).wd_on_out(on_out)));
        ASSERT_TRUE(a && a->dora_scale.defined()) << what;
        auto W = torch::randn(l.weight_shape());
        a->init_dora(W);  // what the network does at wrap time; also done lazily on first use
        // ‖W‖ per output row (dims 1…) or per input column (dims 0, 2…), kept as (O, 1, …) / (1, I, 1, …)
        std::vector<int64_t> dims;
        for (int64_t d = 0; d < W.dim(); ++d)
          if (d != (on_out ? 0 : 1)) dims.push_back(d);
        auto expected = W.pow(2).sum(dims, /*keepdim=*/true).sqrt();
        EXPECT_EQ(a->dora_scale.sizes(), expected.sizes()) << what;
        EXPECT_TRUE(all_close(a->dora_scale, expected, 1e-6, 1e-6, what + " dora_scale"));
        // ΔW = 0 at init, so W' = W·‖W‖/(‖W‖ + ε) = W up to ε
        torch::NoGradGuard g;
        EXPECT_TRUE(all_close(a->apply_weight(W, 1.0), W, 1e-6, 1e-6, what + " W' at init"));
        auto x = input_for(l);
        EXPECT_TRUE(all_close(a->bypass_forward(x, W, {}, 1.0), layer_forward(x, l, W, {}), 1e-5, 1e-5,
                              what + " bypass at init"));
        // a later host weight does not re-initialise the magnitude
        auto W2 = torch::randn(l.weight_shape());
        a->apply_weight(W2, 1.0);
        EXPECT_TRUE(all_close(a->dora_scale, expected, 1e-6, 1e-6, what + " dora_scale kept"));
      }
}

TEST(AdapterInit, FullStartsWithZeroDiff) {
  for (bool bias : {true, false}) {
    const auto l = LayerSpec::conv(4, 8, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 1, bias);
    auto a = std::dynamic_pointer_cast<FullImpl>(find_algorithm("full").create(l, base_options("full")));
    ASSERT_TRUE(a);
    EXPECT_EQ(a->diff.sizes(), torch::IntArrayRef(l.weight_shape()));
    EXPECT_EQ(a->diff.count_nonzero().item<int64_t>(), 0);
    EXPECT_EQ(a->diff_b.defined(), bias);
    if (bias) {
      EXPECT_EQ(a->diff_b.sizes(), torch::IntArrayRef({8}));
      EXPECT_EQ(a->diff_b.count_nonzero().item<int64_t>(), 0);
    }
    EXPECT_EQ(a->file_tensors().size(), bias ? 2u : 1u);
    EXPECT_EQ(a->parameters().size(), bias ? 2u : 1u);  // trains W (and b) itself
  }
}

// ---------------------------------------------------------------- dropout family (docs/training.md#dropout)

// The same adapter twice: one with every dropout on, one without (same seed → same initialisation).
std::pair<AdapterPtr, AdapterPtr> twins(const std::string& algo, const LayerSpec& l, AdapterOptions dropouts,
                                        const torch::Tensor& W) {
  torch::manual_seed(11);
  auto with = find_algorithm(algo).create(l, dropouts);
  torch::manual_seed(11);
  auto without = find_algorithm(algo).create(
      l, AdapterOptions(dropouts).dropout(0).rank_dropout(0).module_dropout(0).rank_dropout_scale(false));
  torch::manual_seed(12);
  perturb(*with, W);
  torch::manual_seed(12);
  perturb(*without, W);
  return {with, without};
}

TEST(AdapterDropout, EvaluationIsDeterministicAndDropoutFree) {
  for (const auto& a : algorithms()) {
    const auto l = host_for(a.name);
    auto W = torch::randn(l.weight_shape()), b = torch::randn({l.out_features});
    auto x = input_for(l);
    auto [with, without] =
        twins(a.name, l, base_options(a.name).dropout(0.5).rank_dropout(0.5).module_dropout(0.5).rank_dropout_scale(true), W);
    with->eval();
    without->eval();
    torch::NoGradGuard g;
    for (int i = 0; i < 3; ++i) {
      EXPECT_TRUE(torch::equal(with->apply_weight(W, 0.8), without->apply_weight(W, 0.8))) << a.name;
      EXPECT_TRUE(torch::equal(with->apply_bias(b, 0.8), without->apply_bias(b, 0.8))) << a.name;
      EXPECT_TRUE(torch::equal(with->bypass_forward(x, W, b, 0.8), without->bypass_forward(x, W, b, 0.8))) << a.name;
    }
  }
}

TEST(AdapterDropout, ModuleDropoutSkipsWithItsProbability) {
  torch::manual_seed(13);
  const double p = 0.25;
  const int n = 800;
  for (const auto& a : algorithms()) {
    const auto l = host_for(a.name);
    auto W = torch::randn(l.weight_shape()), b = torch::randn({l.out_features});
    auto x = input_for(l);
    auto adapter = a.create(l, base_options(a.name).module_dropout(p));
    perturb(*adapter, W);
    adapter->train();
    torch::NoGradGuard g;
    int skipped = 0, skipped_bypass = 0;
    const auto base = layer_forward(x, l, W, b);
    for (int i = 0; i < n; ++i) {
      skipped += torch::equal(adapter->apply_weight(W, 1.0), W);
      skipped_bypass += torch::equal(adapter->bypass_forward(x, W, b, 1.0), base);
    }
    // σ = √(p(1−p)/n) ≈ 0.015: 4.5σ
    EXPECT_NEAR(skipped / double(n), p, 0.07) << a.name << " rebuild";
    EXPECT_NEAR(skipped_bypass / double(n), p, 0.07) << a.name << " bypass";
    adapter->eval();
    for (int i = 0; i < 20; ++i) EXPECT_FALSE(torch::equal(adapter->apply_weight(W, 1.0), W)) << a.name << " eval";
  }
}

// Rebuild-mode "rank dropout" of the low-rank family drops whole output rows of ΔW (docs/loaders.md#q26-rank-dropout-axis), keep iff
// u > p; with rank_dropout_scale the kept rows are divided by the mask's mean (kept / O).
TEST(AdapterDropout, RankDropoutDropsOutputRowsOfTheDelta) {
  torch::manual_seed(14);
  const double p = 0.4;
  for (auto algo : {"lora", "loha", "lokr", "glokr"})
    for (bool rescale : {false, true}) {
      const auto l = LayerSpec::linear(6, 16);
      auto W = torch::randn(l.weight_shape());
      auto [with, without] = twins(algo, l, base_options(algo).rank_dropout(p).rank_dropout_scale(rescale), W);
      with->train();
      without->eval();
      torch::NoGradGuard g;
      auto full = without->apply_weight(W, 1.0) - W;
      int dropped = 0, rows = 0;
      for (int i = 0; i < 100; ++i) {
        auto d = with->apply_weight(W, 1.0) - W;
        int64_t kept = 0;
        for (int64_t o = 0; o < 16; ++o) kept += d[o].abs().max().item<double>() > 0;
        const double factor = rescale && kept > 0 ? 16.0 / static_cast<double>(kept) : 1.0;
        for (int64_t o = 0; o < 16; ++o) {
          const bool is_kept = d[o].abs().max().item<double>() > 0;
          if (is_kept)
            EXPECT_TRUE(all_close(d[o], full[o] * factor, 1e-5, 1e-4, std::string(algo) + " kept row"));
          dropped += !is_kept;
          ++rows;
        }
      }
      EXPECT_NEAR(dropped / double(rows), p, 0.05) << algo;
      // the neuron dropout never acts on the rebuilt weight
      with->eval();
      EXPECT_TRUE(torch::equal(with->apply_weight(W, 1.0), without->apply_weight(W, 1.0))) << algo;
    }
}

// All-zero mask with rank_dropout_scale: no 0/0 (docs/loaders.md#q47-rank-dropout-zero-mask), the delta is simply dropped.
TEST(AdapterDropout, RankDropoutScaleGuardsAnEmptyMask) {
  for (auto algo : {"lora", "loha", "lokr", "norm"}) {
    const auto l = host_for(algo);
    auto W = torch::randn(l.weight_shape());
    auto a = find_algorithm(algo).create(l, base_options(algo).rank_dropout(1.0).rank_dropout_scale(true));
    perturb(*a, W);
    a->train();
    torch::NoGradGuard g;
    auto out = a->apply_weight(W, 1.0);
    EXPECT_FALSE(out.isnan().any().item<bool>()) << algo;
    EXPECT_TRUE(torch::equal(out, W)) << algo;
  }
}

// LoRA bypass: rank dropout acts on the r rank channels of down(x) (keep iff u > p, divided by the mask
// mean with rank_dropout_scale); neuron dropout is inverted dropout on the delta.
TEST(AdapterDropout, LoRABypassDropsRankChannelsAndNeurons) {
  torch::manual_seed(15);
  const auto l = kLinear;
  auto W = torch::randn(l.weight_shape());
  auto x = torch::randn({5, 6});
  auto [with, without] = twins("lora", l, base_options("lora").rank(2).rank_dropout(0.5).rank_dropout_scale(true), W);
  auto lora = std::dynamic_pointer_cast<LoRAImpl>(without);
  torch::NoGradGuard g;
  const double s = 2.0 / 2;  // alpha / r
  auto h = torch::matmul(x, lora->lora_down.t());  // (5, 2)
  auto part = [&](int64_t i) { return torch::matmul(h.slice(1, i, i + 1), lora->lora_up.slice(1, i, i + 1).t()) * s; };
  const std::vector<torch::Tensor> outcomes = {torch::zeros({5, 8}), part(0) + part(1), 2 * part(0), 2 * part(1)};
  std::vector<int> seen(4, 0);
  with->train();
  const auto base = layer_forward(x, l, W, {});
  for (int i = 0; i < 200; ++i) {
    auto delta = with->bypass_forward(x, W, {}, 1.0) - base;
    int match = -1;
    for (size_t k = 0; k < outcomes.size(); ++k)
      if (torch::allclose(delta, outcomes[k], 1e-5, 1e-5)) match = static_cast<int>(k);
    ASSERT_GE(match, 0) << "bypass delta is not a rank-channel subset";
    ++seen[static_cast<size_t>(match)];
  }
  for (int k = 0; k < 4; ++k) EXPECT_GT(seen[static_cast<size_t>(k)], 25) << "outcome " << k;  // each ≈ 1/4

  // neuron dropout (p = 0.5): every delta entry is 0 or twice the full delta; rebuild unaffected
  auto [drop, plain] = twins("lora", l, base_options("lora").rank(2).dropout(0.5), W);
  drop->train();
  plain->eval();
  auto full = plain->bypass_forward(x, W, {}, 1.0) - base;
  auto delta = drop->bypass_forward(x, W, {}, 1.0) - base;
  auto zero = delta.abs() < 1e-7, doubled = (delta - 2 * full).abs() < 1e-5;
  EXPECT_TRUE((zero | doubled).all().item<bool>());
  EXPECT_GT(zero.sum().item<int64_t>(), 5);
  EXPECT_GT(doubled.sum().item<int64_t>(), 5);
  EXPECT_TRUE(torch::equal(drop->apply_weight(W, 1.0), plain->apply_weight(W, 1.0)));
}

// Norm: a channel mask on w_norm and b_norm together (keep iff u > p; the reference's inverted mask is
// docs/loaders.md#q25-norm-defects), rescaled by the mean only with rank_dropout_scale.
TEST(AdapterDropout, NormDropsChannelsOfBothDeltas) {
  torch::manual_seed(16);
  const auto l = LayerSpec::layer_norm(16);
  auto w = torch::randn({16}), b = torch::randn({16});
  for (bool rescale : {false, true}) {
    auto [with, without] = twins("norm", l, base_options("norm").rank_dropout(0.5).rank_dropout_scale(rescale), w);
    with->train();
    without->eval();
    torch::NoGradGuard g;
    auto dw_full = without->apply_weight(w, 0.7) - w, db_full = without->apply_bias(b, 0.7) - b;
    int dropped = 0;
    for (int i = 0; i < 50; ++i) {
      auto dw = with->apply_weight(w, 0.7) - w, db = with->apply_bias(b, 0.7) - b;
      auto kept = dw.abs() > 0;
      EXPECT_TRUE(torch::equal(kept, db.abs() > 0)) << "weight and bias masks differ";
      const int64_t k = kept.sum().item<int64_t>();
      const double factor = rescale && k > 0 ? 16.0 / static_cast<double>(k) : 1.0;
      EXPECT_TRUE(all_close(dw, torch::where(kept, dw_full * factor, torch::zeros_like(dw)), 1e-5, 1e-5, "w mask"));
      EXPECT_TRUE(all_close(db, torch::where(kept, db_full * factor, torch::zeros_like(db)), 1e-5, 1e-5, "b mask"));
      dropped += 16 - static_cast<int>(k);
    }
    EXPECT_NEAR(dropped / 800.0, 0.5, 0.07);
  }
}

// Algorithms without neuron / rank dropout (docs/training.md#dropout: Full, (IA)^3, BOFT, DyLoRA) train exactly as
// without them; GLoRA has none in rebuild mode.
TEST(AdapterDropout, AlgorithmsWithoutDropoutIgnoreIt) {
  for (auto algo : {"full", "ia3", "boft", "dylora", "glora"}) {
    const auto l = kLinear;
    auto W = torch::randn(l.weight_shape()), b = torch::randn({8});
    auto [with, without] = twins(algo, l, base_options(algo).dropout(0.5).rank_dropout(0.5), W);
    with->train();
    without->train();
    auto dy_with = std::dynamic_pointer_cast<DyLoRAImpl>(with), dy_without = std::dynamic_pointer_cast<DyLoRAImpl>(without);
    torch::NoGradGuard g;
    for (int i = 0; i < 5; ++i) {
      if (dy_with) {
        dy_with->set_active_blocks(1 + i % 2);
        dy_without->set_active_blocks(1 + i % 2);
      }
      EXPECT_TRUE(torch::equal(with->apply_weight(W, 1.0), without->apply_weight(W, 1.0))) << algo;
      EXPECT_TRUE(torch::equal(with->apply_bias(b, 1.0), without->apply_bias(b, 1.0))) << algo;
      if (std::string(algo) != "glora") {
        auto x = input_for(l);
        EXPECT_TRUE(torch::equal(with->bypass_forward(x, W, b, 1.0), without->bypass_forward(x, W, b, 1.0))) << algo;
      }
    }
  }
}

// GLoRA bypass (the only place its dropouts act) and Diag-OFT (dropout on the entries of m·R) are random
// in training.
TEST(AdapterDropout, GLoRABypassAndDiagOFTDropInTraining) {
  torch::manual_seed(17);
  for (auto algo : {"glora", "diag-oft"}) {
    const auto l = kLinear;
    auto W = torch::randn(l.weight_shape());
    auto x = input_for(l);
    auto [with, without] = twins(algo, l, base_options(algo).dropout(0.3).rank_dropout(0.3), W);
    with->train();
    without->train();
    torch::NoGradGuard g;
    auto reference = without->bypass_forward(x, W, {}, 1.0);
    int differs = 0;
    for (int i = 0; i < 10; ++i) differs += !torch::allclose(with->bypass_forward(x, W, {}, 1.0), reference);
    EXPECT_GT(differs, 5) << algo;
  }
}

// ---------------------------------------------------------------- the option table (docs/training.md#overrides)

// One setting of an option and how to read it back.
struct Spelling {
  std::string key;
  OptionValue value;
  std::function<bool(const AdapterOptions&)> is_set;
};

// The reference's spellings (preset keys, per-module overrides) and the aliases it accepts.
std::vector<Spelling> reference_spellings() {
  using O = const AdapterOptions&;
  return {
      {"use_tucker", true, [](O o) { return o.tucker(); }},
      {"tucker", true, [](O o) { return o.tucker(); }},
      {"use_cp", true, [](O o) { return o.tucker(); }},
      {"use_scalar", true, [](O o) { return o.use_scalar(); }},
      {"weight_decompose", true, [](O o) { return o.dora(); }},
      {"dora", true, [](O o) { return o.dora(); }},
      {"dora_wd", true, [](O o) { return o.dora(); }},
      {"wd_on_out", false, [](O o) { return !o.wd_on_out(); }},
      {"wd_on_output", false, [](O o) { return !o.wd_on_out(); }},
      {"rs_lora", true, [](O o) { return o.rs_lora(); }},
      {"dropout", 0.125, [](O o) { return o.dropout() == 0.125; }},
      {"rank_dropout", 0.25, [](O o) { return o.rank_dropout() == 0.25; }},
      {"rank_dropout_scale", true, [](O o) { return o.rank_dropout_scale(); }},
      {"module_dropout", 0.5, [](O o) { return o.module_dropout() == 0.5; }},
      {"factor", int64_t{3}, [](O o) { return o.factor() == 3; }},
      {"decompose_both", true, [](O o) { return o.decompose_both(); }},
      {"full_matrix", true, [](O o) { return o.full_matrix(); }},
      {"unbalanced_factorization", true, [](O o) { return o.unbalanced_factorization(); }},
      {"block_size", int64_t{2}, [](O o) { return o.block_size() == 2; }},
      {"constraint", 0.75, [](O o) { return o.constraint() == 0.75; }},
      {"constrain", 0.75, [](O o) { return o.constraint() == 0.75; }},
      {"rescaled", true, [](O o) { return o.rescaled(); }},
      {"train_on_input", true, [](O o) { return o.train_on_input(); }},
      {"bypass_mode", true, [](O o) { return o.bypass_mode(); }},
  };
}

TEST(OptionTable, EveryReferenceKeyAndAliasSetsItsOption) {
  for (const auto& s : reference_spellings()) {
    AdapterOptions o;
    ASSERT_FALSE(s.is_set(o)) << s.key << " is set by default";
    ModuleOverride{}.set(s.key, s.value).apply_to(o, "test");
    EXPECT_TRUE(s.is_set(o)) << s.key;
  }
  // an integer where a number is expected is fine; the wrong type or an unknown key is an error naming it
  AdapterOptions o;
  ModuleOverride{}.set("constraint", int64_t{2}).apply_to(o, "test");
  EXPECT_EQ(o.constraint(), 2.0);
  expect_option_error([] { ModuleOverride{}.set("use_tucker", int64_t{3}).validate("preset.toml"); },
                      {"preset.toml", "use_tucker", "boolean"}, "wrong type");
  expect_option_error([] { ModuleOverride{}.set("use_tuker", true).validate("preset.toml"); },
                      {"preset.toml", "use_tuker", "use_tucker"}, "unknown key");
}

TEST(OptionTable, SavedMetadataNamesEveryOptionInTheReferenceSpelling) {
  auto model = std::make_shared<torch::nn::SequentialImpl>(torch::nn::Linear(8, 8));
  auto module = AdapterOptions().algo("lokr").factor(2).decompose_both(true).rank_dropout(0.25).constraint(0.75);
  auto net = create_lycoris(model, 1.0, 4, 2.0, NetworkOptions().module(module));
  const auto path = test::temp_dir("option_table") + "/net.safetensors";
  net->save_weights(path);
  const auto meta = io::SafetensorsFile::open(path).metadata();
  const auto j = nlohmann::json::parse(meta.at("lycoris_options"));
  for (const auto& s : reference_spellings()) {
    if (s.key == "tucker" || s.key == "use_cp" || s.key == "dora" || s.key == "dora_wd" || s.key == "wd_on_output" ||
        s.key == "constrain")
      continue;  // aliases are read, never written
    EXPECT_TRUE(j.contains(s.key)) << s.key << " missing from " << j.dump();
  }
  EXPECT_EQ(j.at("factor"), 2);
  EXPECT_EQ(j.at("decompose_both"), true);
  EXPECT_EQ(j.at("rank_dropout"), 0.25);
  EXPECT_EQ(j.at("constraint"), 0.75);
  EXPECT_EQ(j.at("weight_decompose"), false);
  EXPECT_EQ(j.at("algo"), "lokr");
}

// Every option an algorithm's registry entry says it reads is taken without a "does not apply" warning.
TEST(OptionTable, OptionsAnAlgorithmReadsAreNotWarnedAbout) {
  for (const auto& a : algorithms()) {
    for (const auto& name : a.options) {
      AdapterOptions o = base_options(a.name);
      bool known = false;
      for (const auto& s : reference_spellings())
        if (s.key == name || (name == "tucker" && s.key == "use_tucker") || (name == "dora" && s.key == "weight_decompose")) {
          ModuleOverride{}.set(s.key, s.value).apply_to(o, "test");
          known = true;
          break;
        }
      ASSERT_TRUE(known) << a.name << " lists '" << name << "', which is no option";
      WarningCollector w;
      try {
        a.create(host_for(a.name), o);
      } catch (const OptionError&) {  // e.g. a Tucker core on a Linear layer: refused, not ignored
      }
      for (const auto& m : w.messages) EXPECT_EQ(m.find("does not apply"), std::string::npos) << a.name << ": " << m;
    }
  }
}

}  // namespace options_test
