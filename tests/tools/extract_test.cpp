// `lycoris extract`: rank rules against matrices with known singular values, Eckart–Young optimality on the
// golden cases (base + merged(golden adapter)), exact Kronecker / Tucker recovery, the LoHa bound, the sparse
// bias, the randomized SVD, and clear errors (library and CLI).
#include <algorithm>
#include <filesystem>
#include <map>

#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/svd.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/tools/extract.hpp"
#include "test_util.hpp"

namespace extract_test {

using namespace lycoris;
using namespace lycoris::tools;
namespace F = lycoris::functional;
using lycoris::test::run_cli;
using lycoris::test::with_words;

// A (m, n) matrix with exactly the singular values s (random orthonormal U, V).
torch::Tensor with_singular_values(int64_t m, int64_t n, const std::vector<double>& s, torch::ScalarType dt) {
  auto opts = torch::TensorOptions().dtype(dt);
  const int64_t k = static_cast<int64_t>(s.size());
  auto U = std::get<0>(torch::linalg_qr(torch::randn({m, k}, opts)));
  auto V = std::get<0>(torch::linalg_qr(torch::randn({n, k}, opts)));
  return (U * torch::tensor(s, opts).unsqueeze(0)).matmul(V.t());
}

// base weight key → tuned − base for every floating weight of the golden case (merged at m = 1).
std::map<std::string, torch::Tensor> golden_deltas(const std::string& c) {
  auto base = io::SafetensorsFile::open(test::data_path("golden/" + c + "/base.safetensors"));
  auto merged = io::SafetensorsFile::open(test::data_path("golden/" + c + "/merged_m1.safetensors"));
  std::map<std::string, torch::Tensor> out;
  for (const auto& name : base.names())
    if (name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0)
      out[name] = merged.tensor(name, torch::kFloat64) - base.tensor(name, torch::kFloat64);
  return out;
}

// base weight key → ΔW of an adapter file, read by our loader (independent of the extraction code).
std::map<std::string, torch::Tensor> file_deltas(const std::string& adapter, const std::string& base) {
  auto loaded = load_adapter_for_base(adapter, base);
  auto file = io::SafetensorsFile::open(base);
  std::map<std::string, torch::Tensor> out;
  for (const auto& m : loaded.modules) {
    auto W = file.tensor(m.target.layer.weight_key, torch::kFloat32);
    out[m.target.layer.weight_key] = (m.adapter->apply_weight(W, 1.0) - W).to(torch::kFloat64);
  }
  return out;
}

double tail_norm(const torch::Tensor& D, int64_t r) {
  auto s = torch::linalg_svdvals(D.reshape({D.size(0), -1}).to(torch::kFloat64));
  return s.narrow(0, r, s.size(0) - r).square().sum().sqrt().item<double>();
}

ExtractOptions fp32(ExtractOptions o) {
  o.dtype = torch::kFloat32;
  o.svd = F::SVDMethod::Full;
  return o;
}

// ---------------------------------------------------------------- rank rules

TEST(ExtractRank, RulesOnKnownSingularValues) {
  auto S = torch::tensor({8.0, 4.0, 2.0, 1.0, 0.5, 0.25}, torch::kFloat64);  // Σσ = 15.75
  EXPECT_EQ(select_rank(S, {RankMode::Fixed, 3}), 3);
  EXPECT_EQ(select_rank(S, {RankMode::Threshold, 1.0}), 3);   // σ > 1 strictly: 8, 4, 2
  EXPECT_EQ(select_rank(S, {RankMode::Threshold, 0.9}), 4);
  EXPECT_EQ(select_rank(S, {RankMode::Ratio, 0.25}), 2);      // σ > 2 strictly: 8, 4
  EXPECT_EQ(select_rank(S, {RankMode::Ratio, 0.2}), 3);
  EXPECT_EQ(select_rank(S, {RankMode::Quantile, 0.8}), 2);    // cumsum 8, 12 < 12.6; 14 is not
  EXPECT_EQ(select_rank(S, {RankMode::Quantile, 12.0 / 15.75}), 1);  // the crossing component is not kept
  EXPECT_EQ(select_rank(S, {RankMode::Quantile, 0.1}), 0);    // → 1 after the clamp
  EXPECT_EQ(clamp_rank(0, 12, 16), 1);
  EXPECT_EQ(clamp_rank(40, 12, 16), 12);
  EXPECT_EQ(clamp_rank(40, 64, 3), 3);  // I is the channel count
  // docs/tools.md#extract-rank-modes quantile check: fractions 0.162, 0.297, 0.420, 0.535 → r = 3 at q = 0.5, r = 1 at q = 0.1
  auto T = torch::tensor({6.763, 5.652, 5.163, 4.81, 4.5, 4.2, 3.9, 3.6, 3.42}, torch::kFloat64);
  EXPECT_EQ(select_rank(T, {RankMode::Quantile, 0.5}), 3);
  EXPECT_EQ(clamp_rank(select_rank(T, {RankMode::Quantile, 0.1}), 12, 16), 1);
}

TEST(ExtractRank, ModesSelectTheReferenceRankOnAMatrix) {
  torch::manual_seed(1);
  // 24×32 linear ΔW with σ = 10, 6, 3, 1.5, 0.7, 0.2 (far from every boundary below)
  auto D = with_singular_values(24, 32, {10, 6, 3, 1.5, 0.7, 0.2}, torch::kFloat32);
  auto rank_of = [&](RankMode mode, double p) {
    ExtractOptions o;
    o.mode = mode, o.linear_param = p;
    return extract_layer(D, {}, o).rank;
  };
  EXPECT_EQ(rank_of(RankMode::Threshold, 2.0), 3);
  EXPECT_EQ(rank_of(RankMode::Ratio, 0.1), 4);           // σ > 1
  EXPECT_EQ(rank_of(RankMode::Quantile, 0.8), 2);        // Σσ = 21.4: cumsum 10, 16 < 17.12, 19 is not
  EXPECT_EQ(rank_of(RankMode::Fixed, 5), 5);
  EXPECT_EQ(rank_of(RankMode::Threshold, 100.0), 1);     // max(1, 0)
  // full fallback at r ≥ O/2 (12 of 24), with diff_b carrying the bias change
  ExtractOptions o;
  o.linear_param = 12;
  auto fit = extract_layer(D, torch::ones({24}), o);
  EXPECT_EQ(fit.form, "diff");
  ASSERT_EQ(fit.tensors.size(), 2u);
  EXPECT_EQ(fit.tensors[1].first, "diff_b");
  o.linear_param = 11;
  fit = extract_layer(D, torch::ones({24}), o);
  EXPECT_EQ(fit.form, "lora");
  EXPECT_NE(fit.note.find("bias change dropped"), std::string::npos);
  // reference layout: alpha (1,) = r, up (O, r) with the singular values, down (r, I) orthonormal rows
  EXPECT_EQ(fit.tensors[0].first, "alpha");
  EXPECT_EQ(fit.tensors[0].second.sizes(), torch::IntArrayRef({1}));
  EXPECT_EQ(fit.tensors[0].second.item<double>(), 11);
  auto down = fit.tensors[2].second;
  EXPECT_TRUE(test::all_close(down.matmul(down.t()), torch::eye(11), 1e-4, 0, "down rows orthonormal"));
}

// ---------------------------------------------------------------- golden: Eckart–Young optimum

TEST(ExtractGolden, LoConRecoversGoldenLoRAAndIsOptimalAtLowerRank) {
  const std::string dir = test::temp_dir("extract_golden");
  const std::string base = test::data_path("golden/lora/base.safetensors");
  const std::string merged = test::data_path("golden/lora/merged_m1.safetensors");
  auto truth = golden_deltas("lora");
  for (int64_t r : {4, 1}) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ExtractOptions o = fp32({});
    o.linear_param = static_cast<double>(r), o.conv_param = static_cast<double>(std::min<int64_t>(r, 2));
    const std::string out = dir + "/r" + std::to_string(r) + ".safetensors";
    auto report = extract(base, merged, out, o);
    auto got = file_deltas(out, base);
    size_t changed = 0;
    for (const auto& [key, D] : truth) {
      if (D.abs().max().item<double>() == 0) continue;
      ++changed;
      ASSERT_TRUE(got.count(key)) << key;
      const int64_t O = D.size(0), rank = D.dim() > 2 && D.numel() / (D.size(0) * D.size(1)) > 1
                                             ? std::min<int64_t>(r, 2)
                                             : r;
      const double err = (got[key] - D).norm().item<double>();
      const double optimum = static_cast<double>(rank) >= O / 2.0 ? 0.0 : tail_norm(D, rank);
      EXPECT_NEAR(err, optimum, 2e-5 * D.norm().item<double>() + 1e-6) << key;
    }
    EXPECT_EQ(report.layers.size(), changed);
    EXPECT_EQ(report.unchanged + changed, truth.size());
    if (r == 4) EXPECT_LT(report.total_rel_error, 1e-5);
  }
  // names and alpha: lycoris_<path>, alpha (1,) = r
  auto f = io::SafetensorsFile::open(dir + "/r4.safetensors");
  EXPECT_TRUE(f.contains("lycoris_blocks_0_attn_to_q.lora_up.weight"));
  EXPECT_EQ(f.tensor("lycoris_blocks_0_attn_to_q.alpha").sizes(), torch::IntArrayRef({1}));
  EXPECT_EQ(f.tensor("lycoris_blocks_0_attn_to_q.alpha", torch::kFloat64).item<double>(), 4);
  EXPECT_TRUE(f.contains("lycoris_blocks_0_ff_net_0.diff"));  // rank 4 ≥ 8/2: full difference
  EXPECT_TRUE(f.contains("lycoris_blocks_0_ff_net_0.diff_b"));
}

TEST(ExtractGolden, LoKrRecoversGoldenKroneckerDelta) {
  const std::string dir = test::temp_dir("extract_golden_lokr");
  const std::string base = test::data_path("golden/lokr/base.safetensors");
  ExtractOptions o = fp32({});
  o.algo = ExtractAlgo::LoKr;
  o.linear_param = 2, o.conv_param = 2;
  auto report = extract(base, test::data_path("golden/lokr/merged_m1.safetensors"), dir + "/k.safetensors", o);
  auto got = file_deltas(dir + "/k.safetensors", base);
  for (const auto& [key, D] : golden_deltas("lokr")) {
    if (D.abs().max().item<double>() == 0) continue;
    ASSERT_TRUE(got.count(key)) << key;
    EXPECT_LT((got[key] - D).norm().item<double>(), 1e-5 * D.norm().item<double>()) << key;
  }
  EXPECT_LT(report.total_rel_error, 1e-5);
  for (const auto& l : report.layers) EXPECT_EQ(l.form.rfind("lokr", 0), 0u) << l.module;
}

TEST(ExtractGolden, KohyaPrefixAndFp16Output) {
  const std::string dir = test::temp_dir("extract_kohya");
  ExtractOptions o;
  o.prefix = "kohya";
  o.linear_param = 4, o.conv_param = 2;
  auto report = extract(test::data_path("golden/lora/base.safetensors"),
                        test::data_path("golden/lora/merged_m1.safetensors"), dir + "/k.safetensors", o);
  auto f = io::SafetensorsFile::open(dir + "/k.safetensors");
  EXPECT_TRUE(f.contains("lora_unet_blocks_0_attn_to_q.lora_down.weight"));
  EXPECT_EQ(f.info("lora_unet_blocks_0_attn_to_q.lora_down.weight").dtype, io::DType::F16);
  EXPECT_EQ(f.info("lora_unet_blocks_0_attn_to_q.alpha").dtype, io::DType::F16);
  EXPECT_LT(report.total_rel_error, 2e-3);  // fp16 rounding only
}

// ---------------------------------------------------------------- LoKr, Tucker, LoHa, sparse bias

TEST(ExtractFits, LoKrRecoversExactKroneckerProducts) {
  torch::manual_seed(2);
  // Linear 12×16: (a, p) = (3, 4), (c, q) = (4, 4); W2 full (rank 2 ≥ 4/2)
  auto W1 = torch::randn({3, 4}), W2 = torch::randn({4, 4});
  auto D = torch::kron(W1, W2);
  auto fit = fit_lokr(D, 2);
  EXPECT_EQ(fit.form, "lokr(full w2)");
  EXPECT_LT((fit_delta(fit, D.sizes()) - D).norm().item<double>(), 1e-5 * D.norm().item<double>());
  // Linear 64×64 with a rank-1 W2 (8×8): low-rank w2_a (8, 1), w2_b (1, 8)
  auto V1 = torch::randn({8, 8}), V2 = torch::randn({8, 1}).matmul(torch::randn({1, 8}));
  D = torch::kron(V1, V2);
  fit = fit_lokr(D, 1);
  EXPECT_EQ(fit.form, "lokr");
  TensorMap m(fit.tensors.begin(), fit.tensors.end());
  EXPECT_EQ(m.at("lokr_w2_a").sizes(), torch::IntArrayRef({8, 1}));
  EXPECT_EQ(m.at("lokr_w2_b").sizes(), torch::IntArrayRef({1, 8}));
  EXPECT_LT((fit_delta(fit, D.sizes()) - D).norm().item<double>(), 1e-5 * D.norm().item<double>());
  // Conv2d 16×8×3×3: (4, 4), (2, 4); W2 (4, 4, 3, 3) of rank 1 as (4, 36)
  auto C1 = torch::randn({4, 2}), C2 = torch::randn({4, 1}).matmul(torch::randn({1, 36})).reshape({4, 4, 3, 3});
  D = (C1.reshape({4, 1, 2, 1, 1, 1}) * C2.reshape({1, 4, 1, 4, 3, 3})).reshape({16, 8, 3, 3});
  fit = fit_lokr(D, 1);
  EXPECT_EQ(fit.form, "lokr");
  EXPECT_LT((fit_delta(fit, D.sizes()) - D).norm().item<double>(), 1e-5 * D.norm().item<double>());
  // a rank-1 Kronecker fit of a general matrix is the nearest Kronecker product: better than W1 ⊗ W2 perturbed
  auto G = torch::randn({12, 16});
  auto g = fit_lokr(G, 2);
  const double eg = (fit_delta(g, G.sizes()) - G).norm().item<double>();
  TensorMap gm(g.tensors.begin(), g.tensors.end());
  auto perturbed = torch::kron(gm.at("lokr_w1") * 1.01, gm.at("lokr_w2"));
  EXPECT_LT(eg, (perturbed - G).norm().item<double>());
}

TEST(ExtractFits, TuckerLayoutAndExactnessOnATuckerDelta) {
  torch::manual_seed(3);
  // ΔW = up · mid · down (reference Tucker form), 12×16×3×3, r = 2: recovered exactly
  auto up = torch::randn({12, 2}), mid = torch::randn({2, 2, 3, 3}), down = torch::randn({2, 16});
  auto D = torch::einsum("oi,ijhw,jc->ochw", {up, mid, down}).contiguous();
  ExtractOptions o;
  o.tucker = true;
  auto fit = fit_locon(D, 2, o);
  EXPECT_EQ(fit.form, "lora+tucker");
  TensorMap m(fit.tensors.begin(), fit.tensors.end());
  EXPECT_EQ(m.at("lora_down.weight").sizes(), torch::IntArrayRef({2, 16, 1, 1}));
  EXPECT_EQ(m.at("lora_mid.weight").sizes(), torch::IntArrayRef({2, 2, 3, 3}));
  EXPECT_EQ(m.at("lora_up.weight").sizes(), torch::IntArrayRef({12, 2, 1, 1}));
  EXPECT_LT((fit_delta(fit, D.sizes()) - D).norm().item<double>(), 1e-4 * D.norm().item<double>());
  // a general conv difference: the second truncation can only lose (docs/tools.md#extract-locon)
  auto G = torch::randn({12, 16, 3, 3});
  auto plain = fit_locon(G, 3), tucker = fit_locon(G, 3, o);
  const double ep = (fit_delta(plain, G.sizes()) - G).norm().item<double>();
  const double et = (fit_delta(tucker, G.sizes()) - G).norm().item<double>();
  EXPECT_NEAR(ep, tail_norm(G, 3), 1e-4 * G.norm().item<double>());
  EXPECT_GE(et, ep - 1e-5);
}

TEST(ExtractFits, LoHaNeverWorseThanLoConAtRankAndFitsHadamardTargets) {
  torch::manual_seed(4);
  // documented bound: LoHa rank r ≤ LoCon rank r (ALS starts there and keeps its best iterate)
  auto G = torch::randn({24, 40});
  for (int64_t r : {1, 2, 4}) {
    const double loha = (fit_delta(fit_loha(G, r), G.sizes()) - G).norm().item<double>();
    EXPECT_LE(loha, tail_norm(G, r) * (1 + 1e-5)) << "rank " << r;
  }
  // an exact Hadamard product of two rank-3 matrices (rank up to 9): ALS more than halves the rank-3 LoCon
  // error (it does not reach the exact factors: at equal parameter count, LoCon rank 6, it stays behind —
  // the documented limit of the ALS fit)
  auto H = torch::randn({24, 3}).matmul(torch::randn({3, 40})) * torch::randn({24, 3}).matmul(torch::randn({3, 40}));
  ExtractOptions o;
  o.loha_iters = 100, o.loha_tol = 1e-6;
  auto fit = fit_loha(H, 3, o);
  const double loha = (fit_delta(fit, H.sizes()) - H).norm().item<double>();
  EXPECT_LT(loha, 0.6 * tail_norm(H, 3));
  // the conv layout: w1b/w2b are (r, I·k)
  auto C = torch::randn({8, 4, 3, 3});
  TensorMap m;
  auto cf = fit_loha(C, 2);
  m.insert(cf.tensors.begin(), cf.tensors.end());
  EXPECT_EQ(m.at("hada_w1_b").sizes(), torch::IntArrayRef({2, 36}));
  EXPECT_LE((fit_delta(cf, C.sizes()) - C).norm().item<double>(), tail_norm(C, 2) * (1 + 1e-5));
}

TEST(ExtractFits, SparseBiasKeepsTheLargestResidualEntries) {
  torch::manual_seed(5);
  auto D = torch::randn({12, 16});
  ExtractOptions o;
  o.sparse_bias = true, o.sparsity = 0.9;
  auto fit = fit_locon(D, 2, o);
  TensorMap m(fit.tensors.begin(), fit.tensors.end());
  ASSERT_TRUE(m.count("bias_indices"));
  // numpy quantile position (192 − 1)·0.9 = 171.9: the 20 entries ranked 172…191 are kept
  EXPECT_EQ(m.at("bias_indices").sizes(), torch::IntArrayRef({2, 20}));
  EXPECT_EQ(m.at("bias_indices").scalar_type(), torch::kInt16);
  EXPECT_EQ(m.at("bias_size").scalar_type(), torch::kInt16);
  EXPECT_EQ(m.at("bias_size").to(torch::kInt64)[1].item<int64_t>(), 16);
  auto lowrank = fit_locon(D, 2);
  auto E = D - fit_delta(lowrank, D.sizes());
  auto top = std::get<0>(E.abs().flatten().topk(20));
  auto vals = m.at("bias_values").abs();
  EXPECT_TRUE(test::all_close(std::get<0>(vals.sort(0, true)), top, 1e-6, 0, "kept = largest |residual|"));
  // the loader adds the sparse residual: the file's ΔW is closer than the low-rank part alone
  const double with = (fit_delta(fit, D.sizes()) - D).norm().item<double>();
  const double expect2 = E.square().sum().item<double>() - top.square().sum().item<double>();
  EXPECT_NEAR(with * with, expect2, 1e-4 * E.square().sum().item<double>());
}

// ---------------------------------------------------------------- randomized SVD

TEST(ExtractSvd, RandomizedMatchesTheOptimumOnADecayingSpectrum) {
  torch::manual_seed(6);
  std::vector<double> s;
  for (int i = 0; i < 60; ++i) s.push_back(std::pow(0.85, i));
  auto M = with_singular_values(200, 300, s, torch::kFloat32);
  auto full = F::svd_truncated(M, 8, F::SVDMethod::Full);
  auto rnd = F::svd_truncated(M, 8, F::SVDMethod::Randomized);
  const double ef = (M - full.reconstruct()).norm().item<double>();
  const double er = (M - rnd.reconstruct()).norm().item<double>();
  EXPECT_LE(er, ef * 1.01);
  EXPECT_TRUE(test::all_close(rnd.S, full.S, 1e-4, 1e-3, "top singular values"));
  EXPECT_TRUE(test::all_close(rnd.U.t().matmul(rnd.U), torch::eye(8), 1e-4, 0, "U orthonormal"));
  // svd_product: exact SVD of A·B without forming it
  auto A = torch::randn({50, 5}), B = torch::randn({5, 70});
  auto p = F::svd_product(A, B);
  EXPECT_TRUE(test::all_close(p.reconstruct(), A.matmul(B), 1e-4, 1e-4, "A·B"));
  EXPECT_TRUE(test::all_close(p.S, torch::linalg_svdvals(A.matmul(B)).narrow(0, 0, 5), 1e-4, 1e-4, "σ"));
}

// ---------------------------------------------------------------- the streaming tool

// fp16 checkpoints with every kind of layer the streaming loop distinguishes: changed Linear/Conv (low rank +
// noise), byte-identical, changed only within allclose tolerance, changed just beyond it, a norm, biases.
struct StreamCase {
  std::string base, tuned;
  std::map<std::string, torch::Tensor> delta;  // weight key → tuned − base (fp64) of the changed layers
};

StreamCase stream_case(const std::string& dir) {
  torch::manual_seed(7);
  auto h = [](const torch::Tensor& t) { return t.to(torch::kFloat16); };
  std::vector<std::pair<std::string, torch::Tensor>> base, tuned;
  auto add = [&](const std::string& key, const torch::Tensor& b, const torch::Tensor& t) {
    base.emplace_back(key, h(b));
    tuned.emplace_back(key, h(t));
  };
  auto W1 = torch::randn({48, 40}), W2 = torch::randn({24, 16, 3, 3}), W3 = torch::randn({16, 16});
  auto lowrank = [](int64_t o, int64_t i) {
    return torch::randn({o, 6}).matmul(torch::randn({6, i})) * 0.05 + torch::randn({o, i}) * 0.002;
  };
  add("a.lin.weight", W1, W1 + lowrank(48, 40));
  add("a.lin.bias", torch::randn({48}), torch::randn({48}));
  add("b.conv.weight", W2, W2 + lowrank(24, 144).reshape({24, 16, 3, 3}));
  add("c.same.weight", W3, W3);
  add("d.tiny.weight", torch::full({8, 8}, 1024.0), torch::full({8, 8}, 1025.0));  // |Δ| = 1 > 1e-8 + 1e-5·1025
  add("e.zero.weight", torch::zeros({8, 8}), -torch::zeros({8, 8}));  // +0 vs −0: other bytes, allclose
  add("f.norm.weight", torch::ones({16}), torch::ones({16}) * 1.5);
  const std::string b = dir + "/base.safetensors", t = dir + "/tuned.safetensors";
  io::save_file(b, base);
  io::save_file(t, tuned);
  StreamCase c{b, t, {}};
  auto fb = io::SafetensorsFile::open(b), ft = io::SafetensorsFile::open(t);
  for (const auto& [key, _] : base) {
    if (key.size() < 7 || key.compare(key.size() - 7, 7, ".weight") != 0) continue;
    auto wb = fb.tensor(key, torch::kFloat32), wt = ft.tensor(key, torch::kFloat32);
    if (!torch::allclose(wt, wb, 1e-5, 1e-8)) c.delta[key] = (wt - wb).to(torch::kFloat64);
  }
  return c;
}

TEST(ExtractStreaming, SameTensorsAsTheLayerFitsAndExactReportedErrors) {
  const std::string dir = test::temp_dir("extract_stream");
  auto c = stream_case(dir);
  ASSERT_EQ(c.delta.size(), 4u);  // a.lin, b.conv, d.tiny (|Δ| = 1 > 1e-8 + 1e-5·1025), f.norm
  ExtractOptions o = fp32({});
  o.linear_param = 3, o.conv_param = 2;
  auto report = extract(c.base, c.tuned, dir + "/out.safetensors", o);
  EXPECT_EQ(report.unchanged, 2u);  // c.same, e.zero
  EXPECT_EQ(report.skipped, 1u);    // the norm (not in full mode)
  auto out = io::SafetensorsFile::open(dir + "/out.safetensors");
  auto got = file_deltas(dir + "/out.safetensors", c.base);
  for (const auto& l : report.layers) {
    if (l.form == "skipped") continue;
    SCOPED_TRACE(l.key);
    const auto& D = c.delta.at(l.key);
    // the written tensors are exactly those of the layer-level rule on D (the non-streaming path)
    auto fit = extract_layer(D.to(torch::kFloat32), {}, o);
    for (const auto& [suffix, t] : fit.tensors) {
      auto stored = out.tensor(l.module + "." + suffix, torch::kFloat32);
      EXPECT_TRUE(torch::equal(stored, t.to(torch::kFloat32).reshape(stored.sizes()))) << suffix;
    }
    // the reported error is the error of the file, as an independent loader reads it
    const double err = (got.at(l.key) - D).norm().item<double>() / D.norm().item<double>();
    EXPECT_NEAR(l.rel_error, err, 1e-5 * err + 1e-6);
  }
  // fp16 output: the error is that of the rounded factors
  o.dtype = torch::kFloat16;
  // each reported error against the file's, as the loader reads it back (d.tiny excluded: the loader's
  // W + ΔW − W at |W| = 1024 rounds ΔW to 2⁻¹³ in fp32 — not the file's error)
  auto expect_file_errors = [&](const std::string& file, double rtol) {
    report = extract(c.base, c.tuned, file, o);
    got = file_deltas(file, c.base);
    for (const auto& l : report.layers) {
      if (l.form == "skipped" || l.key == "d.tiny.weight") continue;
      const auto& D = c.delta.at(l.key);
      const double err = (got.at(l.key) - D).norm().item<double>() / D.norm().item<double>();
      EXPECT_NEAR(l.rel_error, err, rtol * err + 1e-6) << file << " " << l.key;
    }
  };
  expect_file_errors(dir + "/half.safetensors", 1e-4);
  o.dtype = torch::kFloat32;
  // LoKr: the reported error (computed blockwise, without a rebuild) is the file's error
  o.algo = ExtractAlgo::LoKr, o.linear_param = 2, o.conv_param = 2;
  expect_file_errors(dir + "/kron.safetensors", 1e-5);
  o.algo = ExtractAlgo::LoCon, o.linear_param = 3, o.conv_param = 2;
  // full mode: differences, diff_b and the norm as w_norm, each exactly tuned − base
  o.mode = RankMode::Full;
  report = extract(c.base, c.tuned, dir + "/full.safetensors", o);
  auto full = io::SafetensorsFile::open(dir + "/full.safetensors");
  EXPECT_TRUE(torch::equal(full.tensor("lycoris_a_lin.diff", torch::kFloat64), c.delta.at("a.lin.weight")));
  EXPECT_TRUE(torch::equal(full.tensor("lycoris_f_norm.w_norm", torch::kFloat64), c.delta.at("f.norm.weight")));
  auto fb = io::SafetensorsFile::open(c.base), ft = io::SafetensorsFile::open(c.tuned);
  EXPECT_TRUE(torch::equal(full.tensor("lycoris_a_lin.diff_b", torch::kFloat32),
                           ft.tensor("a.lin.bias", torch::kFloat32) - fb.tensor("a.lin.bias", torch::kFloat32)));
  EXPECT_EQ(report.unchanged, 2u);
  for (const auto& l : report.layers) EXPECT_LT(l.rel_error, 1e-7) << l.key;
}

TEST(ExtractStreaming, GramSingularValuesMatchTheSvd) {
  torch::manual_seed(8);
  std::vector<double> s;
  for (int i = 0; i < 40; ++i) s.push_back(10 * std::pow(0.7, i));
  for (auto [m, n] : {std::pair<int64_t, int64_t>{60, 500}, {500, 60}}) {
    auto M = with_singular_values(m, n, s, torch::kFloat32);
    auto g = F::singular_values_gram(M);
    ASSERT_EQ(g.size(0), 60);
    // absolute accuracy ~1e-8·σ_1 in fp64, then fp32 rounding of each value
    EXPECT_TRUE(test::all_close(g.narrow(0, 0, 40).to(torch::kFloat64), torch::tensor(s, torch::kFloat64), 1e-6,
                                1e-6, "σ"));
    EXPECT_LT(g.narrow(0, 40, 20).abs().max().item<double>(), 1e-5);
  }
}

// ---------------------------------------------------------------- errors

TEST(ExtractErrors, BadInputsAndOptions) {
  const std::string dir = test::temp_dir("extract_errors");
  io::save_file(dir + "/base.safetensors", {{"a.weight", torch::zeros({4, 3})}, {"b.weight", torch::zeros({4, 4})}});
  io::save_file(dir + "/shape.safetensors", {{"a.weight", torch::ones({4, 4})}, {"b.weight", torch::ones({4, 4})}});
  io::save_file(dir + "/missing.safetensors", {{"a.weight", torch::ones({4, 3})}});
  const std::string out = dir + "/out.safetensors";
  EXPECT_THROW(extract(dir + "/base.safetensors", dir + "/shape.safetensors", out, {}), ShapeError);
  EXPECT_THROW(extract(dir + "/base.safetensors", dir + "/missing.safetensors", out, {}), KeyError);
  EXPECT_THROW(extract(dir + "/base.safetensors", dir + "/nothing.safetensors", out, {}), Error);
  EXPECT_FALSE(std::filesystem::exists(out));
  try {
    extract(dir + "/base.safetensors", dir + "/shape.safetensors", out, {});
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("a.weight"), std::string::npos) << e.what();
  }
  // rank larger than the layer (layer-level fits)
  EXPECT_THROW(fit_locon(torch::randn({4, 3}), 4), ShapeError);
  EXPECT_THROW(fit_loha(torch::randn({4, 3}), 0), ShapeError);
  EXPECT_THROW(fit_lokr(torch::randn({16, 16}), 5), ShapeError);  // W2 is 4×4
  // bad option values
  auto bad = [&](ExtractOptions o) { EXPECT_THROW(extract(dir + "/base.safetensors", dir + "/base.safetensors", out, o), OptionError); };
  ExtractOptions o;
  o.linear_param = 0;
  bad(o);
  o = {}, o.mode = RankMode::Ratio, o.conv_param = 1.5;
  bad(o);
  o = {}, o.mode = RankMode::Quantile, o.linear_param = -0.1;
  bad(o);
  o = {}, o.mode = RankMode::Threshold, o.linear_param = -1;
  bad(o);
  o = {}, o.sparse_bias = true, o.sparsity = 1.5;
  bad(o);
  o = {}, o.sparse_bias = true, o.algo = ExtractAlgo::LoHa;
  bad(o);
  EXPECT_THROW(parse_extract_algo("lycoris"), OptionError);
  EXPECT_THROW(parse_rank_mode("percentile"), OptionError);
}

TEST(ExtractErrors, CliExitsNonZeroWithOneLine) {
  const std::string dir = test::temp_dir("extract_cli_errors");
  io::save_file(dir + "/base.safetensors", {{"a.weight", torch::zeros({4, 3})}});
  io::save_file(dir + "/shape.safetensors", {{"a.weight", torch::ones({4, 4})}});
  const std::string b = dir + "/base.safetensors", o = dir + "/o.safetensors";
  // bad input exits 1, a bad option value 2 (a usage error)
  for (const auto& [args, code] : std::vector<std::pair<std::vector<std::string>, int>>{
           {{"extract", b, dir + "/shape.safetensors", "-o", o}, 1},
           {{"extract", b, b, "-o", o, "--mode", "ratio", "--linear-ratio", "2"}, 2},
           {{"extract", b, b, "-o", o, "--algo", "nope"}, 2},
           {{"extract", b, b, "-o", o, "--linear-dim", "0"}, 2},
           {{"extract", b, b, "-o", o, "--dtype", "int8"}, 2}}) {
    auto r = run_cli(args);
    EXPECT_EQ(r.code, code) << ::testing::PrintToString(args);
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("lycoris: error: ", 0), 0u) << r.err;
  }
  EXPECT_FALSE(std::filesystem::exists(dir + "/o.safetensors"));
  // a working run: exit 0
  io::save_file(dir + "/tuned.safetensors", {{"a.weight", torch::randn({4, 3})}});
  auto ok = run_cli({"extract", b, dir + "/tuned.safetensors", "-o", o, "--linear-dim", "1"});
  EXPECT_EQ(ok.code, 0) << ok.err;
  EXPECT_TRUE(std::filesystem::exists(dir + "/o.safetensors"));
}

// ---------------------------------------------------------------- non-finite values, torch errors, output path

// `extract BASE TUNED -o OUT_DIR/o.safetensors ARGS` must fail with exit 1 and one stderr line holding every
// one of `expected`, leaving OUT_DIR empty.
void expect_one_line_error(const std::string& base, const std::string& tuned, const std::string& args,
                           const std::vector<std::string>& expected) {
  const std::string out_dir = test::temp_dir("extract_fail_out");
  auto r = run_cli(with_words({"extract", base, tuned, "-o", out_dir + "/o.safetensors"}, args));
  EXPECT_EQ(r.code, 1) << tuned;
  EXPECT_EQ(r.err.rfind("lycoris: error: ", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  for (const auto& e : expected) EXPECT_NE(r.err.find(e), std::string::npos) << "'" << e << "' not in: " << r.err;
  EXPECT_EQ(test::listing(out_dir).size(), 0u) << tuned;
}

TEST(ExtractNonFinite, NaNOrInfInputIsAOneLineErrorNamingFileAndKey) {
  const std::string dir = test::temp_dir("extract_nonfinite");
  torch::manual_seed(4);
  auto W = torch::randn({8, 6}), b = torch::randn({8});
  const std::string base = dir + "/base.safetensors";
  io::save_file(base, {{"a.weight", W}, {"a.bias", b}, {"c.weight", W}});
  auto nan_w = W + 1, inf_b = b.clone();
  nan_w[2][3] = NAN;
  inf_b[5] = -INFINITY;
  io::save_file(dir + "/nan.safetensors", {{"a.weight", W + 1}, {"a.bias", b}, {"c.weight", nan_w}});
  io::save_file(dir + "/inf_bias.safetensors", {{"a.weight", W + 1}, {"a.bias", inf_b}, {"c.weight", W}});
  for (const auto* mode : {"--linear-dim 2", "--mode full"}) {
    SCOPED_TRACE(mode);
    expect_one_line_error(base, dir + "/nan.safetensors", mode,
                          {dir + "/nan.safetensors: tensor 'c.weight' has 1 NaN/Inf value(s)"});
    expect_one_line_error(base, dir + "/inf_bias.safetensors", mode,
                          {dir + "/inf_bias.safetensors: tensor 'a.bias' has 1 NaN/Inf value(s)"});
    // NaN in the base (and tuned − base of finite values beyond F32) name the base / the subtraction
    expect_one_line_error(dir + "/nan.safetensors", base, mode,
                          {dir + "/nan.safetensors: tensor 'c.weight' has 1 NaN/Inf value(s)"});
  }
  io::save_file(dir + "/neg.safetensors", {{"a.weight", torch::full({8, 6}, -3e38)}});
  io::save_file(dir + "/pos.safetensors", {{"a.weight", torch::full({8, 6}, 3e38)}});
  expect_one_line_error(dir + "/neg.safetensors", dir + "/pos.safetensors", "",
                        {dir + "/pos.safetensors: tensor 'a.weight': tuned − base overflows F32"});
}

TEST(ExtractNonFinite, F16OverflowOfTheOutputIsAnErrorSuggestingAWiderDtype) {
  const std::string dir = test::temp_dir("extract_f16");
  torch::manual_seed(6);
  const std::string base = dir + "/base.safetensors", tuned = dir + "/tuned.safetensors";
  io::save_file(base, {{"a.weight", torch::zeros({8, 6})}});
  io::save_file(tuned, {{"a.weight", torch::randn({8, 6}) * 1e5}});
  for (const auto* mode : {"--linear-dim 1", "--mode full"}) {
    SCOPED_TRACE(mode);
    expect_one_line_error(base, tuned, mode,
                          {tuned + ": layer a.weight: lycoris_a.", "overflow F16: choose a wider --dtype"});
    // the same layer fits fp32
    auto ok = run_cli(with_words({"extract", base, tuned, "-o", dir + "/o.safetensors", "--dtype", "fp32"}, mode));
    EXPECT_EQ(ok.code, 0) << ok.err;
    auto f = io::SafetensorsFile::open(dir + "/o.safetensors");
    for (const auto& n : f.names()) EXPECT_TRUE(torch::isfinite(f.tensor(n)).all().item<bool>()) << n;
  }
}

TEST(ExtractErrors, TorchErrorsAreOneLineNamingFileAndLayer) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "needs a build where the cuda device fails";
  const std::string dir = test::temp_dir("extract_torch_error");
  const std::string base = dir + "/base.safetensors", tuned = dir + "/tuned.safetensors";
  io::save_file(base, {{"a.weight", torch::zeros({8, 6})}});
  io::save_file(tuned, {{"a.weight", torch::ones({8, 6})}});
  // the library on a device torch cannot use: torch's error (whose what() holds a C++ backtrace) in the
  // work on a layer comes out as one line naming the file and the layer
  ExtractOptions o;
  o.device = torch::Device("cuda");
  try {
    extract(base, tuned, dir + "/o.safetensors", o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind(tuned + ": layer a.weight: ", 0), 0u) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
  }
  EXPECT_EQ(test::listing(dir).size(), 2u);
  // the CLI refuses such a device before any work
  for (const auto* device : {"cuda", "cuda:3", "meta", "nope"}) {
    auto r = run_cli({"extract", base, tuned, "-o", dir + "/o.safetensors", "--device", device});
    EXPECT_TRUE(r.code == 1 || r.code == 2) << r.code;
    EXPECT_EQ(r.err.rfind(std::string("lycoris: error: --device: '") + device + "'", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  EXPECT_EQ(test::listing(dir).size(), 2u);
}

TEST(ExtractErrors, UnwritableOutputFailsBeforeAnyWork) {
  const std::string dir = test::temp_dir("extract_output_path");
  torch::manual_seed(9);
  const std::string base = dir + "/base.safetensors", tuned = dir + "/tuned.safetensors";
  io::save_file(base, {{"a.weight", torch::randn({64, 48})}, {"b.weight", torch::randn({32, 32, 3, 3})}});
  io::save_file(tuned, {{"a.weight", torch::randn({64, 48})}, {"b.weight", torch::randn({32, 32, 3, 3})}});
  const std::string out_dir = test::temp_dir("extract_output_path_out");
  for (const auto& out : {std::string("/nonexistent/dir/x.safetensors"), out_dir}) {
    SCOPED_TRACE(out);
    int layers = 0;
    try {
      extract(base, tuned, out, {}, [&](const ExtractLayerReport&) { ++layers; });
      ADD_FAILURE() << "no error";
    } catch (const IOError& e) {
      EXPECT_EQ(std::string(e.what()).rfind(out + ": cannot write here: ", 0), 0u) << e.what();
    }
    EXPECT_EQ(layers, 0);  // no layer was extracted
    auto r = run_cli({"extract", base, tuned, "-o", out, "--linear-dim", "4", "--conv-dim", "4"});
    EXPECT_EQ(r.code, 1);
    EXPECT_EQ(r.err.rfind("lycoris: error: " + out + ": cannot write here: ", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  EXPECT_EQ(test::listing(out_dir).size(), 0u);
  EXPECT_FALSE(std::filesystem::exists("/nonexistent"));
  // a plain output in a writable directory still works
  auto ok = run_cli({"extract", base, tuned, "-o", out_dir + "/x.safetensors", "--linear-dim", "4"});
  EXPECT_EQ(ok.code, 0) << ok.err;
  EXPECT_EQ(io::SafetensorsFile::open(out_dir + "/x.safetensors").names().size(), 6u);  // 2 × alpha, up, down
  EXPECT_EQ(test::listing(out_dir).size(), 1u);
}

}  // namespace extract_test
