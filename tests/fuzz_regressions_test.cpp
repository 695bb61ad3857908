// Inputs found by fuzz/fuzz_adapter_load (reproducers in fuzz/corpus/adapter_load), reduced to the module
// that misbehaved: each one loads cleanly and then must either work or fail with a lycoris::Error, never
// with a torch exception or wrong shapes.
#include <limits>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/tools/merge.hpp"
#include "test_util.hpp"
#include "tools/merge/merge_tensor.hpp"

namespace fuzz_regressions_test {

using namespace lycoris;

// One 4×4 rotation block of a fuzzed file: a NaN on the diagonal among values up to 1e34. Elimination on
// I − Q meets an exactly zero pivot, so an inverse that checks for singularity threw from merge.
torch::Tensor nan_block() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  return torch::tensor({-0.0108982231f, 0.109185338f, -0.0361197628f, 0.0230663139f, 3.03978583e-26f, nan,
                        3.96655772e+25f, -1365.85522f, -1.84718588e+28f, 7.8355155f, 2.39585796e+16f,
                        -7.15601612e-27f, 4.10190101e+33f, -7.78208818e+16f, 7.7800778e+34f, -4.26610096e-17f})
      .reshape({4, 4});
}

TEST(FuzzRegressions, OftBlocksWithNaNGiveNonFiniteWeightNotATorchError) {
  const auto layer = LayerSpec::linear(4, 4);
  const auto W = torch::randn({4, 4});
  for (const auto& blocks : {nan_block().reshape({1, 4, 4}), nan_block().reshape({1, 1, 4, 4})}) {
    SCOPED_TRACE(c10::str(blocks.sizes()));
    auto a = load_adapter("lycoris_m", {{"oft_blocks", blocks}}, layer);
    a->eval();
    torch::Tensor out;
    ASSERT_NO_THROW(out = a->apply_weight(W, 1.0));
    EXPECT_FALSE(torch::isfinite(out).all().item<bool>());
    // merge reports NaN/Inf (naming the module) from this result
    auto merged = W.clone();
    EXPECT_FALSE(tools::merge_tensor(W, merged, {tools::MergeStep{a.get(), 1.0}}));
    EXPECT_NO_THROW(a->bypass_forward(torch::randn({2, 4}), W, torch::Tensor(), 1.0));
  }
}

// A Diag-OFT / BOFT constraint (stored as alpha, here F64) beyond the fp32 range: clipping Q at C = c·O made
// torch refuse C as an fp32 scalar. Such a bound never binds for finite blocks: the result is the unconstrained one.
TEST(FuzzRegressions, OftConstraintBeyondFloatRangeDoesNotBind) {
  const auto layer = LayerSpec::linear(4, 4);
  const auto W = torch::randn({4, 4});
  for (const auto& blocks : {torch::randn({2, 2, 2}), torch::randn({2, 2, 2, 2})}) {
    SCOPED_TRACE(c10::str(blocks.sizes()));
    auto huge = load_adapter("lycoris_m", {{"oft_blocks", blocks}, {"alpha", torch::tensor(1.6e219, torch::kFloat64)}}, layer);
    auto none = load_adapter("lycoris_m", {{"oft_blocks", blocks}}, layer);
    torch::Tensor out;
    ASSERT_NO_THROW(out = huge->apply_weight(W, 1.0));
    EXPECT_TRUE(torch::equal(out, none->apply_weight(W, 1.0)));
  }
}

// alpha is applied (and saved) in float32: an F64 alpha of 1e300 loaded, then failed in merge_tensor and
// file_tensors with torch's "cannot be converted to type float without overflow". Now a FormatError at load.
TEST(FuzzRegressions, AlphaBeyondFloatRangeIsAFormatError) {
  const auto layer = LayerSpec::linear(8, 8);
  const auto alpha = torch::tensor(1e300, torch::kFloat64);
  auto r = [](std::vector<int64_t> s) { return torch::randn(s); };
  const std::vector<std::pair<std::string, TensorMap>> cases = {
      {"lora", {{"lora_down.weight", r({2, 8})}, {"lora_up.weight", r({8, 2})}, {"alpha", alpha}}},
      {"dylora", {{"lora_down.weight", r({2, 8})}, {"lora_up.weight", r({8, 2})}, {"alpha", alpha}}},
      {"loha", {{"hada_w1_a", r({8, 2})}, {"hada_w1_b", r({2, 8})}, {"hada_w2_a", r({8, 2})}, {"hada_w2_b", r({2, 8})},
                {"alpha", alpha}}},
      {"lokr", {{"lokr_w1", r({2, 2})}, {"lokr_w2_a", r({4, 1})}, {"lokr_w2_b", r({1, 4})}, {"alpha", alpha}}},
      {"glora", {{"a1.weight", r({8, 2})}, {"a2.weight", r({2, 8})}, {"b1.weight", r({8, 2})}, {"b2.weight", r({2, 8})},
                 {"alpha", alpha}}},
      {"glokr", {{"glokr_a_w1", r({2, 2})}, {"glokr_a_w2", r({4, 4})}, {"glokr_b_w1", r({2, 2})},
                 {"glokr_b_w2_a", r({4, 1})}, {"glokr_b_w2_b", r({1, 4})}, {"alpha", alpha}}},
  };
  for (const auto& [algo, tensors] : cases) {
    SCOPED_TRACE(algo);
    try {
      find_algorithm(algo).load("lycoris_m", tensors, layer);
      ADD_FAILURE() << "loaded";
    } catch (const FormatError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("lycoris_m.alpha"), std::string::npos) << msg;
    }
  }
}

// An alpha inside the float32 range whose scale times the multiplier is not (alpha 3e38, rank 1, m = 3): the
// weight overflows to Inf, which merge_tensor reports as non-finite, instead of torch refusing the scalar.
TEST(FuzzRegressions, ScaleTimesMultiplierBeyondFloatRangeOverflowsToInf) {
  const auto layer = LayerSpec::linear(8, 8);
  const auto W = torch::randn({8, 8});
  const auto alpha = torch::tensor(3e38f);
  auto r = [](std::vector<int64_t> s) { return torch::randn(s); };
  const std::vector<TensorMap> modules = {
      {{"lora_down.weight", r({1, 8})}, {"lora_up.weight", r({8, 1})}, {"alpha", alpha}},
      {{"hada_w1_a", r({8, 1})}, {"hada_w1_b", r({1, 8})}, {"hada_w2_a", r({8, 1})}, {"hada_w2_b", r({1, 8})}, {"alpha", alpha}},
      {{"lokr_w1", r({2, 2})}, {"lokr_w2_a", r({4, 1})}, {"lokr_w2_b", r({1, 4})}, {"alpha", alpha}},
      {{"a1.weight", r({8, 1})}, {"a2.weight", r({1, 8})}, {"b1.weight", r({8, 1})}, {"b2.weight", r({1, 8})}, {"alpha", alpha}},
  };
  for (const auto& tensors : modules) {
    auto a = load_adapter("lycoris_m", tensors, layer);
    SCOPED_TRACE(a->algo());
    a->eval();
    torch::Tensor out;
    ASSERT_NO_THROW(out = a->apply_weight(W, 3.0));
    EXPECT_FALSE(torch::isfinite(out).all().item<bool>());
    auto merged = W.clone();
    bool finite = true;
    ASSERT_NO_THROW(finite = tools::merge_tensor(W, merged, {tools::MergeStep{a.get(), 3.0}}));
    EXPECT_FALSE(finite);
  }
}

}  // namespace fuzz_regressions_test
