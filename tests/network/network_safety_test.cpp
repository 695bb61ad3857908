// The network cannot be misused silently (network.hpp): nothing matched, values set in two places, typed
// option builders, merging twice, training the wrong parameters, stale weights at evaluation, option
// validation, moving the model while applied, scalars beyond the save dtype.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <c10/util/Exception.h>

#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/network.hpp"
#include "lycoris/nn/layers.hpp"
#include "lycoris/tools/check.hpp"
#include "test_util.hpp"

namespace network_safety_test {

using namespace lycoris;
using lycoris::test::all_close;

struct TinyImpl : torch::nn::Module {
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  TinyImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(fc1(x))); }
};
TORCH_MODULE(Tiny);

torch::Tensor input() {
  torch::manual_seed(7);
  return torch::randn({5, 8});
}

// Runs f, expecting an exception of type E whose message contains every needle.
template <class E>
void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << what << ": no error";
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << what << ": '" << msg << "' lacks '" << n << "'";
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": unexpected error type: " << e.what();
  }
}

// Perturbs every adapter parameter so that ΔW ≠ 0.
void perturb(LycorisNetwork& net, double scale = 0.3) {
  torch::NoGradGuard g;
  for (auto& p : net->parameters()) p.add_(torch::randn_like(p) * scale);
}

// A Tiny model with a perturbed LoRA network applied to it.
struct Applied {
  Tiny model;
  LycorisNetwork net{nullptr};
};
Applied applied_tiny(uint64_t seed) {
  torch::manual_seed(seed);
  Applied a;
  a.net = create_lycoris(a.model, NetworkOptions());
  perturb(a.net);
  a.net->apply_to();
  return a;
}

// ---------------------------------------------------------------- 1. nothing matched

TEST(NetworkSafety, NothingMatchedIsAnErrorNamingTargetsAndLayers) {
  Tiny model;
  // the attention/MLP preset targets classes an ordinary model does not have
  expect_error<OptionError>([&] { create_lycoris(model, NetworkOptions().preset(Preset::builtin("attn-mlp"))); },
                            {"no layer of the model was adapted", "attn-mlp", "'fc1' (Linear)", "allow_empty"},
                            "attn-mlp on a plain model");
  auto empty = create_lycoris(model, NetworkOptions().preset(Preset::builtin("attn-mlp")).allow_empty(true));
  EXPECT_TRUE(empty->modules().empty());
  // a file none of whose modules matches the model
  auto net = create_lycoris(model, NetworkOptions());
  const auto path = test::temp_dir("safety") + "/tiny.safetensors";
  net->save_weights(path);
  auto other = torch::nn::Sequential(torch::nn::Linear(3, 3));
  expect_error<KeyError>([&] { create_lycoris_from_weights(other.ptr(), path); }, {path, "matches a layer", "lycoris_fc1"},
                         "file matching nothing");
}

// ---------------------------------------------------------------- 2. one place per value

TEST(NetworkSafety, ValuesSetInTwoPlacesMustAgree) {
  Tiny model;
  expect_error<OptionError>([&] { create_lycoris(model, 1.0, 4, 1.0, NetworkOptions().linear_dim(16).linear_alpha(8)); },
                            {"linear_dim", "16", "4"}, "positional dim vs options");
  expect_error<OptionError>([&] { create_lycoris(model, NetworkOptions().module(LoRAOptions().rank(16))); },
                            {"rank(16)", "linear_dim"}, "module rank");
  expect_error<OptionError>([&] { create_lycoris(model, NetworkOptions().module(LoRAOptions().alpha(3))); },
                            {"alpha", "linear_alpha"}, "module alpha");
  // every value from the options
  auto net = create_lycoris(model, NetworkOptions().linear_dim(16).linear_alpha(8));
  ASSERT_EQ(net->modules().size(), 2u);
  for (const auto& m : net->modules()) {
    EXPECT_EQ(m.adapter->rank(), 16);
    EXPECT_EQ(m.adapter->alpha(), 8.0);
  }
  // the same value in both places is fine
  EXPECT_NO_THROW(create_lycoris(model, 1.0, 16, 8.0, NetworkOptions().linear_dim(16)));
}

// ---------------------------------------------------------------- 3. typed builders and names

TEST(NetworkSafety, TypedBuildersSelectTheirAlgorithmAndNamesAreCaseInsensitive) {
  EXPECT_EQ(LoKrOptions().factor(4).algo(), "lokr");
  EXPECT_EQ(LoHaOptions().algo(), "loha");
  EXPECT_EQ(DiagOFTOptions().algo(), "diag-oft");
  Tiny model;
  auto net = create_lycoris(model, NetworkOptions().module(LoKrOptions().factor(4)));
  for (const auto& m : net->modules()) EXPECT_EQ(m.algo, "lokr");
  EXPECT_EQ(find_algorithm("LoKr").name, "lokr");
  EXPECT_EQ(find_algorithm("LoCon").name, "lora");
  EXPECT_EQ(find_algorithm("OFT").name, "diag-oft");
  auto mixed = create_lycoris(model, NetworkOptions().module(AdapterOptions().algo("LoHa")));
  EXPECT_EQ(mixed->options().module().algo(), "loha");
  for (const auto& m : mixed->modules()) EXPECT_EQ(m.algo, "loha");
  expect_error<OptionError>([] { find_algorithm("lokra"); }, {"lokra", "lokr", "locon", "diag_oft"}, "unknown name");
}

// ---------------------------------------------------------------- 4. merging twice

TEST(NetworkSafety, MergeToTwiceAndApplyAfterMergeAreErrors) {
  auto a = applied_tiny(1);
  auto& model = a.model;
  auto& net = a.net;
  torch::NoGradGuard g;
  const auto applied = model->forward(input());
  net->merge_to(1.0);
  EXPECT_TRUE(all_close(model->forward(input()), applied, 1e-5, 1e-5));
  expect_error<Error>([&] { net->merge_to(1.0); }, {"already merged"}, "second merge_to");
  expect_error<Error>([&] { net->apply_to(); }, {"after merge_to"}, "apply_to after merge");
  EXPECT_TRUE(all_close(model->forward(input()), applied, 1e-5, 1e-5)) << "the failed calls changed the model";
}

// ---------------------------------------------------------------- 5. the right parameters train

TEST(NetworkSafety, FreezeModelAndSummary) {
  Tiny model;
  auto net = create_lycoris(model, 1.0, 4, 1.0, NetworkOptions());
  auto before = net->summary();
  // LoRA rank 4 on Linear(8,16) and Linear(16,4): (8+16)·4 + (16+4)·4 = 176 trainable
  EXPECT_EQ(before.trainable, 176);
  EXPECT_EQ(before.modules, 2);
  EXPECT_EQ(before.model_parameters, 8 * 16 + 16 + 16 * 4 + 4);
  EXPECT_EQ(before.model_trainable, before.model_parameters);
  EXPECT_NE(before.text().find("freeze_model"), std::string::npos) << before.text();
  net->apply_to();
  net->freeze_model();
  net->restore();
  for (const auto& p : model->parameters()) EXPECT_FALSE(p.requires_grad()) << "restore unfroze the model";
  auto after = net->summary();
  EXPECT_EQ(after.model_trainable, 0);
  ASSERT_EQ(after.groups.size(), 1u);
  EXPECT_EQ(after.groups[0].algo, "lora");
  EXPECT_EQ(after.groups[0].max_rank, 4);
  const auto text = after.text();
  EXPECT_NE(text.find("trainable params: 176 || all params: 388 || trainable%: 45.3608"), std::string::npos) << text;
  EXPECT_EQ(text.find("freeze_model"), std::string::npos) << text;
}

// ---------------------------------------------------------------- 6. stale weights

TEST(NetworkSafety, StepHelperAndEvalNeverLeaveStaleWeights) {
  auto a = applied_tiny(3);
  auto& model = a.model;
  auto& net = a.net;
  // (AdamW updates the parameters in place, which their version counters record)
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(1e-2));
  auto train_step = [&] {
    auto loss = model->forward(input()).square().mean();
    loss.backward();
  };
  train_step();
  net->step(opt);
  EXPECT_FALSE(net->stale());
  train_step();
  opt.step();  // the mistake: no on_step()
  EXPECT_TRUE(net->stale());
  net->eval();  // refreshes
  EXPECT_FALSE(net->stale());
  torch::NoGradGuard g;
  const auto out = model->forward(input());
  net->refresh();
  EXPECT_TRUE(all_close(model->forward(input()), out, 0, 0)) << "eval() left stale weights";
}

// ---------------------------------------------------------------- 7. validation

TEST(NetworkSafety, LoKrFactorMustBeAutomaticOrPositive) {
  const auto layer = LayerSpec::linear(8, 12);
  for (int64_t f : {0, -2, -5})
    expect_error<OptionError>([&] { find_algorithm("lokr").create(layer, LoKrOptions().factor(f)); },
                              {"factor", std::to_string(f)}, "factor " + std::to_string(f));
  EXPECT_NO_THROW(find_algorithm("lokr").create(layer, LoKrOptions().factor(-1)));
  EXPECT_NO_THROW(find_algorithm("lokr").create(layer, LoKrOptions().factor(5)));  // no divisor 5: closest split ≤ 5
}

// A negative alpha is accepted and flips ΔW (the scale alpha / rank is negative), as in the reference.
TEST(NetworkSafety, NegativeAlphaFlipsTheDelta) {
  torch::manual_seed(4);
  Tiny model;
  auto plus = create_lycoris(model, NetworkOptions().linear_alpha(2));
  auto minus = create_lycoris(model, NetworkOptions().linear_alpha(-2));
  perturb(plus);
  {
    torch::NoGradGuard g;
    auto p = plus->parameters(), q = minus->parameters();
    for (size_t i = 0; i < p.size(); ++i) q[i].copy_(p[i]);
  }
  const auto W0 = model->fc1->weight.detach().clone();
  auto& a = *plus->modules()[0].adapter;
  auto& b = *minus->modules()[0].adapter;
  EXPECT_TRUE(all_close(b.apply_weight(W0, 1.0) - W0, -(a.apply_weight(W0, 1.0) - W0), 1e-6, 1e-6));
}

TEST(NetworkSafety, MovingTheModelWhileAppliedIsNamed) {
  auto a = applied_tiny(5);
  auto& model = a.model;
  auto& net = a.net;
  model->to(torch::kFloat64);
  expect_error<Error>([&] { net->refresh(); }, {"model->to()", "net->to", "fc1"}, "refresh after model->to");
  net->to(torch::kFloat64);  // the fix: recomputed against the moved weights
  torch::NoGradGuard g;
  const auto moved = model->forward(input().to(torch::kFloat64));
  net->restore();
  net->apply_to();
  EXPECT_TRUE(all_close(model->forward(input().to(torch::kFloat64)), moved, 0, 0));
}

TEST(NetworkSafety, BypassFallbackIsReportedAtCreation) {
  Tiny model;  // plain torch::nn::Linear: no drop-in layer to ask the adapters
  auto net = create_lycoris(model, NetworkOptions().module(LoRAOptions().bypass_mode(true)));
  ASSERT_FALSE(net->warnings().empty());
  EXPECT_NE(net->warnings()[0].find("rebuild mode"), std::string::npos) << net->warnings()[0];
}

// ---------------------------------------------------------------- 8. scalars beyond the save dtype

TEST(NetworkSafety, ScalarsBeyondTheSaveDtypeStayF32) {
  Tiny model;
  // a rank beyond both dimensions: LoKr with both factors full, whose alpha (stored as the rank) is ignored
  auto net = create_lycoris(model, 1.0, 100000, 1.0, NetworkOptions().module(LoKrOptions().factor(-1)));
  for (const auto& [key, t] : net->state_tensors(torch::kHalf)) {
    if (key.size() > 6 && key.substr(key.size() - 6) == ".alpha") {
      EXPECT_EQ(t.scalar_type(), torch::kFloat32) << key;
      EXPECT_EQ(t.item<double>(), 100000.0) << key;
    } else if (t.is_floating_point()) {
      EXPECT_EQ(t.scalar_type(), torch::kHalf) << key;
    }
  }
}

// check agrees with the loaders: an alpha nothing reads (LoKr, both factors full: scale 1) may be Inf.
TEST(NetworkSafety, CheckIgnoresTheRangeOfAnUnusedAlpha) {
  const auto dir = test::temp_dir("safety-check");
  io::save_file(dir + "/base.safetensors", {{"fc1.weight", torch::randn({16, 8})}});
  const float inf = std::numeric_limits<float>::infinity();
  io::save_file(dir + "/full.safetensors", {{"lycoris_fc1.lokr_w1", torch::randn({4, 2})},
                                            {"lycoris_fc1.lokr_w2", torch::randn({4, 4})},
                                            {"lycoris_fc1.alpha", torch::tensor(inf).to(torch::kHalf)}});
  auto report = tools::check(dir + "/full.safetensors", dir + "/base.safetensors");
  EXPECT_EQ(report.problems(), 0u) << report.text();
  // where alpha is read (a low-rank factor), Inf is still a problem
  io::save_file(dir + "/lowrank.safetensors", {{"lycoris_fc1.lokr_w1", torch::randn({4, 2})},
                                               {"lycoris_fc1.lokr_w2_a", torch::randn({4, 1})},
                                               {"lycoris_fc1.lokr_w2_b", torch::randn({1, 4})},
                                               {"lycoris_fc1.alpha", torch::tensor(inf).to(torch::kHalf)}});
  auto bad = tools::check(dir + "/lowrank.safetensors", dir + "/base.safetensors");
  EXPECT_GT(bad.problems(), 0u) << bad.text();
}

}  // namespace network_safety_test
