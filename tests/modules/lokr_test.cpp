// LoKr (docs/format.md#lokr): ΔW = s·(W1 ⊗ W2), either factor whole or low-rank (W2 also in Tucker form);
// s = α / r, or 1 when both factors are whole. Checked against worked examples (values derived by hand),
// the layout table of docs/format.md#lokr-layout, the golden cases of the reference, torch::kron, and the
// generic adapter checks (bypass == rebuild, finite differences, file round trip).
#include <map>
#include <tuple>

#include "adapter_checks.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/lokr.hpp"
#include "lycoris/modules/lokr.hpp"

namespace lokr_test {

using namespace lycoris;
using lycoris::test::all_close;

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

// docs/format.md#lokr: W1 = [[1, 0], [2, 1]], W2 = [[1], [−1]]·[[2, 1]] = [[2, 1], [−2, −1]], alpha 3, r = 1 → s = 3;
// the same W2 stored whole makes both factors whole and the scale 1.
TEST(LoKr, FormatExamples) {
  const auto l = LayerSpec::linear(4, 4);
  const auto w1 = torch::tensor({{1.f, 0.f}, {2.f, 1.f}});
  const auto kron = torch::tensor({{2.f, 1.f, 0.f, 0.f}, {-2.f, -1.f, 0.f, 0.f}, {4.f, 2.f, 2.f, 1.f}, {-4.f, -2.f, -2.f, -1.f}});
  auto low_rank = lokr_algorithm().load("lycoris_m",
                                        {{"lokr_w1", w1},
                                         {"lokr_w2_a", torch::tensor({{1.f}, {-1.f}})},
                                         {"lokr_w2_b", torch::tensor({{2.f, 1.f}})},
                                         {"alpha", torch::tensor(3.f)}},
                                        l);
  EXPECT_TRUE(all_close(low_rank->apply_weight(torch::zeros({4, 4}), 1.0), 3 * kron, 1e-6, 0, "s = 3"));
  auto whole = lokr_algorithm().load(
      "lycoris_m", {{"lokr_w1", w1}, {"lokr_w2", torch::tensor({{2.f, 1.f}, {-2.f, -1.f}})}, {"alpha", torch::tensor(3.f)}}, l);
  EXPECT_TRUE(all_close(whole->apply_weight(torch::zeros({4, 4}), 1.0), kron, 1e-6, 0, "both whole: s = 1"));
  // and ΔW is torch::kron(W1, W2)
  EXPECT_TRUE(torch::equal(torch::kron(w1, torch::tensor({{2.f, 1.f}, {-2.f, -1.f}})), kron));
}

// docs/format.md#lokr-layout: the tensors a new adapter stores for each row of the table.
TEST(LoKr, NewAdapterLayoutTable) {
  using Shapes = std::map<std::string, std::vector<int64_t>>;
  const auto lin = LayerSpec::linear(48, 64), conv = LayerSpec::conv(48, 64, {3, 3});
  const auto o = AdapterOptions().algo("lokr");
  const std::vector<std::tuple<LayerSpec, AdapterOptions, Shapes>> rows = {
      {lin, AdapterOptions(o).rank(4), {{"lokr_w1", {8, 6}}, {"lokr_w2", {8, 8}}}},
      {lin, AdapterOptions(o).rank(2).factor(4), {{"lokr_w1", {4, 4}}, {"lokr_w2_a", {16, 2}}, {"lokr_w2_b", {2, 12}}}},
      {lin, AdapterOptions(o).rank(1).decompose_both(true),
       {{"lokr_w1_a", {8, 1}}, {"lokr_w1_b", {1, 6}}, {"lokr_w2_a", {8, 1}}, {"lokr_w2_b", {1, 8}}}},
      {lin, AdapterOptions(o).rank(2).factor(2).unbalanced_factorization(true),
       {{"lokr_w1", {32, 2}}, {"lokr_w2_a", {2, 2}}, {"lokr_w2_b", {2, 24}}}},
      {conv, AdapterOptions(o).rank(2), {{"lokr_w1", {8, 6}}, {"lokr_w2_a", {8, 2}}, {"lokr_w2_b", {2, 72}}}},
      {conv, AdapterOptions(o).rank(2).tucker(true),
       {{"lokr_w1", {8, 6}}, {"lokr_w2_a", {2, 8}}, {"lokr_w2_b", {2, 8}}, {"lokr_t2", {2, 2, 3, 3}}}},
      {conv, AdapterOptions(o).rank(100), {{"lokr_w1", {8, 6}}, {"lokr_w2", {8, 8, 3, 3}}}},
  };
  for (const auto& [layer, options, expected] : rows) {
    auto a = std::dynamic_pointer_cast<LoKrImpl>(lokr_algorithm().create(layer, options));
    ASSERT_TRUE(a);
    Shapes got;
    for (const auto& [key, t] : a->file_tensors())
      if (key != "alpha") got[key] = t.sizes().vec();
    EXPECT_EQ(got, expected) << layer.describe() << " rank " << options.rank();
    // both factors whole: alpha stored as the rank, scale 1
    const bool whole = expected.count("lokr_w1") && expected.count("lokr_w2");
    EXPECT_EQ(a->scale(), whole ? 1.0 : options.alpha() / static_cast<double>(options.rank()));
    if (whole) EXPECT_EQ(a->alpha(), static_cast<double>(options.rank()));
  }
}

// An empty W1 used to reach O % rows(W1) (an integer division by zero) before any check.
TEST(LoadValidation, LoKrEmptyW1IsAShapeError) {
  const std::string module = "lycoris_blk";
  auto z = [](std::vector<int64_t> shape) { return torch::full(shape, 0.25); };
  for (auto w1 : {z({0, 2}), z({2, 0}), z({0, 0})}) {
    SCOPED_TRACE(c10::str(w1.sizes()));
    try {
      load_adapter(module, {{"lokr_w1", w1}, {"lokr_w2", z({4, 4})}}, LayerSpec::linear(8, 8));
      ADD_FAILURE() << "loaded";
    } catch (const ShapeError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(module), std::string::npos) << msg;
      EXPECT_NE(msg.find("lokr_w1"), std::string::npos) << msg;
    }
  }
}

TEST(LoKr, GenericChecksOfEveryVariant) {
  const auto o = AdapterOptions().algo("lokr").rank(1).alpha(1.5);
  test::expect_generic_adapter(lokr_algorithm(), {{"low-rank W2", o},
                                                  {"both whole", AdapterOptions(o).rank(8)},
                                                  {"decompose_both", AdapterOptions(o).decompose_both(true)},
                                                  {"tucker", AdapterOptions(o).tucker(true)},
                                                  {"dora in", AdapterOptions(o).dora(true).wd_on_out(false)},
                                                  {"scalar", AdapterOptions(o).use_scalar(true)}});
}

TEST(LoKr, Golden) {
  for (const char* c : {"lokr", "lokr_f4", "lokr_f8", "lokr_both", "lokr_full", "lokr_tucker", "lokr_alpha"})
    EXPECT_EQ(test::check_golden(c, {lokr_algorithm()}), 9) << c;
}

}  // namespace lokr_test
