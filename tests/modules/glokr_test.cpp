// GLoKr (docs/glokr.md): ΔW = s·(W ×_in (A1 ⊗ A2) + B1 ⊗ B2), B laid out like LoKr (docs/format.md#lokr).
// Checked against torch::kron / einsum written out here, against the LoKr adapter (A = 0), by finite
// differences, and by bypass == rebuild == merge.
#include "adapter_checks.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/glokr.hpp"
#include "lycoris/modules/glokr.hpp"
#include "lycoris/modules/lokr.hpp"

namespace glokr_test {

using namespace lycoris;

namespace {

// Option sets covering every layout: low-rank A2 + low-rank B2, everything full, decompose_both,
// Tucker (convs), DoRA, use_scalar.
std::vector<std::pair<std::string, AdapterOptions>> configs() {
  auto base = AdapterOptions().algo("glokr").alpha(0.5);
  return {{"r1", AdapterOptions(base).rank(1)},
          {"full", AdapterOptions(base).rank(8)},
          {"decompose_both", AdapterOptions(base).rank(1).decompose_both(true)},
          {"tucker", AdapterOptions(base).rank(1).tucker(true)},
          {"dora", AdapterOptions(base).rank(1).dora(true)},
          {"scalar", AdapterOptions(base).rank(1).use_scalar(true)}};
}

std::vector<std::string> keys_of(const AdapterImpl& a) {
  std::vector<std::string> k;
  for (auto& kv : a.file_tensors()) k.push_back(kv.first);
  return k;
}

TensorMap map_of(const NamedTensors& t) {
  TensorMap m;
  for (auto& [k, v] : t) m[k] = v;
  return m;
}

// (W ×_in A)[o, j, κ] = Σ_i W[o, i, κ] A[i, j], written as an einsum over flattened kernels
torch::Tensor times_in(const torch::Tensor& W, const torch::Tensor& A) {
  auto Wf = W.reshape({W.size(0), W.size(1), -1});
  return torch::einsum("oik,ij->ojk", {Wf, A}).reshape(W.sizes());
}

}  // namespace

TEST(GLoKr, ZeroAtInit) {
  for (const auto& [name, o] : configs()) {
    for (const auto& l : test::host_layers()) {
      SCOPED_TRACE(name + " " + l.describe());
      auto a = std::make_shared<GLoKrImpl>(l, o);
      auto W = torch::randn(l.weight_shape());
      torch::NoGradGuard g;
      EXPECT_TRUE(test::all_close(a->apply_weight(W, 1.0), W, 1e-6, 1e-6, "W' = W at init"));
      auto x = test::input_for(l, torch::kFloat32);
      EXPECT_TRUE(test::all_close(a->bypass_forward(x, W, {}, 1.0), layer_forward(x, l, W, {}), 1e-5, 1e-5, "bypass at init"));
      const bool zero = !o.use_scalar();
      // A2 (or A2b) and B2 (or B2b) zero, the others non-zero
      auto a2 = a->glokr_a_w2.defined() ? a->glokr_a_w2 : a->glokr_a_w2_b;
      auto b2 = a->glokr_b_w2.defined() ? a->glokr_b_w2 : a->glokr_b_w2_b;
      EXPECT_EQ(a2.abs().sum().item<double>() == 0, zero);
      EXPECT_EQ(b2.abs().sum().item<double>() == 0, zero);
      EXPECT_GT(a->glokr_a_w1.abs().sum().item<double>(), 0);
    }
  }
}

TEST(GLoKr, Layouts) {
  // Linear 48→64, r=2, factor=4: A from factorization(48, 4) = (4, 12): A1 (4,4), A2 (12,2)·(2,12);
  // B as the LoKr table (docs/format.md#lokr-layout): w1 (4,4), w2_a (16,2), w2_b (2,12)
  auto a = std::make_shared<GLoKrImpl>(LayerSpec::linear(48, 64), AdapterOptions().algo("glokr").rank(2).factor(4));
  std::vector<std::pair<std::string, std::vector<int64_t>>> expected = {
      {"alpha", {}}, {"glokr_a_w1", {4, 4}}, {"glokr_a_w2_a", {12, 2}}, {"glokr_a_w2_b", {2, 12}},
      {"glokr_b_w1", {4, 4}}, {"glokr_b_w2_a", {16, 2}}, {"glokr_b_w2_b", {2, 12}}};
  auto ft = a->file_tensors();
  ASSERT_EQ(ft.size(), expected.size());
  for (size_t i = 0; i < ft.size(); ++i) {
    EXPECT_EQ(ft[i].first, expected[i].first);
    EXPECT_EQ(ft[i].second.sizes().vec(), expected[i].second) << ft[i].first;
  }
  // Conv2d 48→64 3×3, r=2, Tucker: A1 (6,6), A2 (8,2)·(2,8); B w1 (8,6), w2_a (2,8), w2_b (2,8), t2 (2,2,3,3)
  auto c = std::make_shared<GLoKrImpl>(LayerSpec::conv(48, 64, {3, 3}), AdapterOptions().algo("glokr").rank(2).tucker(true));
  expected = {{"alpha", {}},          {"glokr_a_w1", {6, 6}}, {"glokr_a_w2_a", {8, 2}}, {"glokr_a_w2_b", {2, 8}},
              {"glokr_b_w1", {8, 6}}, {"glokr_b_w2_a", {2, 8}}, {"glokr_b_w2_b", {2, 8}}, {"glokr_b_t2", {2, 2, 3, 3}}};
  ft = c->file_tensors();
  ASSERT_EQ(ft.size(), expected.size());
  for (size_t i = 0; i < ft.size(); ++i) {
    EXPECT_EQ(ft[i].first, expected[i].first);
    EXPECT_EQ(ft[i].second.sizes().vec(), expected[i].second) << ft[i].first;
  }
  // full_matrix / large rank: every factor full → s = 1, alpha stored as the rank
  auto f = std::make_shared<GLoKrImpl>(LayerSpec::linear(48, 64), AdapterOptions().algo("glokr").rank(2).full_matrix(true));
  EXPECT_EQ(keys_of(*f), (std::vector<std::string>{"alpha", "glokr_a_w1", "glokr_a_w2", "glokr_b_w1", "glokr_b_w2"}));
  EXPECT_EQ(f->scale(), 1.0);
  EXPECT_EQ(f->alpha(), 2.0);
}

TEST(GLoKr, BypassRebuildRoundTrip) {
  for (const auto& [name, o] : configs()) {
    for (const auto& l : test::host_layers()) {
      SCOPED_TRACE(name + " " + l.describe());
      auto a = std::make_shared<GLoKrImpl>(l, o);
      test::randomize(*a);
      a->to(torch::kFloat64);
      a->eval();
      test::expect_bypass_equals_rebuild(*a, l, 0.7, name + " " + l.describe());
      test::expect_round_trip(*a, glokr_algorithm(), l, name + " " + l.describe());
      // the registry detects it and `info` reads the rank from the stored shapes
      auto m = map_of(a->file_tensors());
      const Algorithm* d = detect_algorithm(m);
      ASSERT_NE(d, nullptr);
      EXPECT_EQ(d->name, "glokr");
      // (0 when every factor is full: no rank is stored)
      EXPECT_EQ(d->rank(m), d->load("m", m, l)->rank());
      if (!functional::glokr::all_full({{a->glokr_a_w1, {}, {}, a->glokr_a_w2, a->glokr_a_w2_a, a->glokr_a_w2_b, {}},
                                        {a->glokr_b_w1, a->glokr_b_w1_a, a->glokr_b_w1_b, a->glokr_b_w2, a->glokr_b_w2_a,
                                         a->glokr_b_w2_b, a->glokr_b_t2}}))
        EXPECT_EQ(d->rank(m), a->rank());
    }
  }
}

TEST(GLoKr, GradientsMatchFiniteDifferences) {
  for (const auto& [name, o] : configs()) {
    for (const auto& l : {LayerSpec::linear(6, 8), LayerSpec::conv(4, 8, {3, 3}, {2, 2}, {1, 1})}) {
      SCOPED_TRACE(name + " " + l.describe());
      auto a = std::make_shared<GLoKrImpl>(l, o);
      test::randomize(*a);
      test::expect_gradients_match(*a, l, 0.7, name + " " + l.describe());
    }
  }
}

TEST(GLoKr, MatchesKroneckerFormula) {
  // ΔW = s·(W ×_in (A1 ⊗ A2a·A2b) + reshape(B1 ⊗ B2a·B2b)), s = alpha / r, computed here with torch::kron
  for (const auto& l : {LayerSpec::linear(6, 8), LayerSpec::conv(4, 8, {3}, {1}, {1}), LayerSpec::conv(4, 8, {3, 3})}) {
    SCOPED_TRACE(l.describe());
    const int64_t I = l.in_features, O = l.out_features, k = l.kernel_numel(), r = 1;
    auto opt = torch::kFloat64;
    auto A1 = torch::randn({2, 2}, opt), A2a = torch::randn({I / 2, r}, opt), A2b = torch::randn({r, I / 2}, opt);
    auto B1 = torch::randn({2, 2}, opt), B2a = torch::randn({O / 2, r}, opt), B2b = torch::randn({r, I / 2 * k}, opt);
    auto a = glokr_algorithm().load("m",
                                    {{"glokr_a_w1", A1}, {"glokr_a_w2_a", A2a}, {"glokr_a_w2_b", A2b}, {"glokr_b_w1", B1},
                                     {"glokr_b_w2_a", B2a}, {"glokr_b_w2_b", B2b}, {"alpha", torch::tensor(0.25)}},
                                    l);
    auto W = torch::randn(l.weight_shape(), opt);
    auto A = torch::kron(A1, torch::matmul(A2a, A2b));
    auto B2 = torch::matmul(B2a, B2b);  // (O/2, I/2·k)
    // K[u·p + x, v·q + y, κ] = B1[u, v]·B2[x, y, κ]: kron of B1 (2,2,1…) with B2 (O/2, I/2, *K)
    std::vector<int64_t> s2{O / 2, I / 2}, s1{2, 2};
    s2.insert(s2.end(), l.kernel.begin(), l.kernel.end());
    s1.resize(s2.size(), 1);
    auto B = torch::kron(B1.reshape(s1), B2.reshape(s2));
    auto dW = 0.25 * (times_in(W, A) + B);
    torch::NoGradGuard g;
    EXPECT_TRUE(test::all_close(a->apply_weight(W, 0.6), W + 0.6 * dW, 1e-10, 1e-10, "W + m·ΔW"));
  }
}

TEST(GLoKr, ZeroBIsWTimesKronA) {
  // B = 0, A2 full: ΔW = W·(A1 ⊗ A2) (all factors full → s = 1 whatever alpha says)
  for (const auto& l : {LayerSpec::linear(6, 8), LayerSpec::conv(4, 8, {3, 3}, {1, 1}, {1, 1}),
                        LayerSpec::conv(6, 4, {3, 3, 3})}) {
    SCOPED_TRACE(l.describe());
    const int64_t I = l.in_features;
    auto A1 = torch::randn({2, 2}, torch::kFloat64), A2 = torch::randn({I / 2, I / 2}, torch::kFloat64);
    std::vector<int64_t> b2{l.out_features / 2, I / 2};
    b2.insert(b2.end(), l.kernel.begin(), l.kernel.end());
    auto a = glokr_algorithm().load("m",
                                    {{"glokr_a_w1", A1}, {"glokr_a_w2", A2}, {"glokr_b_w1", torch::randn({2, 2})},
                                     {"glokr_b_w2", torch::zeros(b2)}, {"alpha", torch::tensor(7.0)}},
                                    l);
    EXPECT_EQ(a->rank(), 0);
    auto W = torch::randn(l.weight_shape(), torch::kFloat64);
    auto expected = W + times_in(W, torch::kron(A1, A2));
    torch::NoGradGuard g;
    EXPECT_TRUE(test::all_close(a->apply_weight(W, 1.0), expected, 1e-10, 1e-10, "W + W·(A1⊗A2)"));
    auto x = test::input_for(l);
    EXPECT_TRUE(test::all_close(a->bypass_forward(x, W, {}, 1.0), layer_forward(x, l, expected, {}), 1e-9, 1e-9,
                                "bypass"));
  }
}

TEST(GLoKr, ZeroAIsLoKr) {
  // A = 0 (A2 zero): GLoKr equals the LoKr adapter loaded from the same B tensors under lokr_* keys
  for (const auto& [name, o] : configs()) {
    if (o.use_scalar() || o.dora()) continue;
    for (const auto& l : test::host_layers()) {
      SCOPED_TRACE(name + " " + l.describe());
      auto g = std::make_shared<GLoKrImpl>(l, o);
      test::randomize(*g);
      {
        torch::NoGradGuard ng;
        (g->glokr_a_w2.defined() ? g->glokr_a_w2 : g->glokr_a_w2_b).zero_();
      }
      TensorMap lokr_map;
      for (auto& [k, v] : g->file_tensors())
        if (k.rfind("glokr_b_", 0) == 0) lokr_map["lokr_" + k.substr(8)] = v;
        else if (k == "alpha") lokr_map[k] = v;
      auto lk = lokr_algorithm().load("m", lokr_map, l);
      g->to(torch::kFloat64);
      lk->to(torch::kFloat64);
      auto W = torch::randn(l.weight_shape(), torch::kFloat64);
      auto x = test::input_for(l);
      torch::NoGradGuard ng;
      if (name != "full") EXPECT_EQ(g->scale(), std::dynamic_pointer_cast<LoKrImpl>(lk)->scale());
      EXPECT_TRUE(test::all_close(g->apply_weight(W, 0.8), lk->apply_weight(W, 0.8), 1e-12, 1e-12, "rebuild"));
      EXPECT_TRUE(test::all_close(g->bypass_forward(x, W, {}, 0.8), lk->bypass_forward(x, W, {}, 0.8), 1e-10, 1e-10,
                                  "bypass"));
    }
  }
}

TEST(GLoKr, InvalidOptionsAndFiles) {
  auto o = AdapterOptions().algo("glokr").rank(2);
  EXPECT_THROW(GLoKrImpl(LayerSpec::linear(8, 8), AdapterOptions(o).rank(0)), OptionError);
  EXPECT_THROW(GLoKrImpl(LayerSpec::linear(8, 8), AdapterOptions(o).dropout(1.5)), OptionError);
  EXPECT_THROW(GLoKrImpl(LayerSpec::linear(8, 8), AdapterOptions(o).rank_dropout(-0.1)), OptionError);
  EXPECT_THROW(GLoKrImpl(LayerSpec::conv(8, 8, {3, 3}, {}, {}, {}, 2), o), OptionError);  // grouped conv
  EXPECT_THROW(GLoKrImpl(LayerSpec::layer_norm(8), o), OptionError);
  EXPECT_THROW(find_algorithm("glokr").create(LayerSpec::group_norm(2, 8), o), OptionError);
  auto l = LayerSpec::linear(6, 8);
  auto good = map_of(std::make_shared<GLoKrImpl>(l, AdapterOptions(o).rank(1))->file_tensors());
  auto load = [&](TensorMap m) { return glokr_algorithm().load("lora_unet_x", m, l); };
  EXPECT_NO_THROW(load(good));
  auto bad = good;
  bad["glokr_a_w1"] = torch::zeros({4, 4});  // 4 does not divide 6
  EXPECT_THROW(load(bad), ShapeError);
  bad = good;
  bad["glokr_a_w2_b"] = torch::zeros({2, 3});  // rank 2 vs glokr_a_w2_a rank 1
  EXPECT_THROW(load(bad), ShapeError);
  bad = good;
  bad["glokr_a_w2"] = torch::zeros({3, 3});  // ambiguous A2
  EXPECT_THROW(load(bad), KeyError);
  bad = good;
  bad.erase("glokr_a_w2_b");
  EXPECT_THROW(load(bad), KeyError);
  bad = good;
  bad["lokr_w1"] = torch::zeros({2, 2});  // unknown key
  EXPECT_THROW(load(bad), KeyError);
  bad = good;
  bad["glokr_b_w2_b"] = torch::zeros({1, 5});
  try {
    load(bad);
    ADD_FAILURE() << "no error";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("glokr_b_w2_b"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("lora_unet_x"), std::string::npos) << e.what();
  }
  // A2 rank 1 but B rank 2: one scale needs one rank
  bad = good;
  bad["glokr_b_w2_a"] = torch::zeros({4, 2});
  bad["glokr_b_w2_b"] = torch::zeros({2, 3});
  EXPECT_THROW(load(bad), ShapeError);
}

TEST(GLoKr, ModuleDropoutAndLowPrecisionHost) {
  for (const auto& l : test::host_layers()) {
    test::expect_module_dropout(glokr_algorithm(), AdapterOptions().algo("glokr").rank(1), l);
    auto a = std::make_shared<GLoKrImpl>(l, AdapterOptions().algo("glokr").rank(1));
    test::randomize(*a);
    test::expect_low_precision_host(*a, l, l.describe());
  }
}

}  // namespace glokr_test
