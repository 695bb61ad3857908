// `lycoris resize`: resizing a golden adapter to its full rank reproduces the golden merged checkpoint
// (LoRA, Tucker, DoRA, DyLoRA conv); a smaller rank gives the Eckart–Young error of the golden ΔW; the rank
// rules; non-LoRA modules are copied; clear errors and non-zero CLI exits.
#include <algorithm>
#include <filesystem>
#include <map>
#include <tuple>

#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/tools/resize.hpp"
#include "test_util.hpp"

namespace resize_test {

using namespace lycoris;
using namespace lycoris::tools;
using lycoris::test::run_cli;
using lycoris::test::with_words;

std::string golden(const std::string& c, const std::string& f) { return test::data_path("golden/" + c + "/" + f); }

// base weight key → merged weight at m = 1 with an adapter file, through our loader.
std::map<std::string, torch::Tensor> merged_with(const std::string& adapter, const std::string& base) {
  auto loaded = load_adapter_for_base(adapter, base);
  auto file = io::SafetensorsFile::open(base);
  std::map<std::string, torch::Tensor> out;
  for (const auto& m : loaded.modules) {
    auto W = file.tensor(m.target.layer.weight_key, torch::kFloat32);
    out[m.target.layer.weight_key] = m.adapter->apply_weight(W, 1.0);
  }
  return out;
}

ResizeOptions dim(int64_t n) {
  ResizeOptions o;
  o.rule = {RankMode::Fixed, static_cast<double>(n)};
  return o;
}

TEST(ResizeGolden, FullRankIsLossless) {
  const std::string dir = test::temp_dir("resize_full");
  for (const std::string c : {"lora", "lora_tucker", "lora_dora", "dylora_conv", "lora_rs"}) {
    SCOPED_TRACE(c);
    const std::string out = dir + "/" + c + ".safetensors";
    auto report = resize(golden(c, "adapter.safetensors"), out, dim(1000));
    EXPECT_GT(report.resized, 0u);
    auto expected = io::SafetensorsFile::open(golden(c, "merged_m1.safetensors"));
    auto got = merged_with(out, golden(c, "base.safetensors"));
    EXPECT_FALSE(got.empty());
    for (const auto& [key, W] : got)
      EXPECT_TRUE(test::all_close(W, expected.tensor(key, torch::kFloat32), 2e-5, 2e-4, key));
    for (const auto& m : report.modules) {
      if (!m.resized) continue;
      EXPECT_EQ(m.new_rank, m.old_rank) << m.module;  // ΔW of these modules has full rank r
      EXPECT_NEAR(m.retained_energy, 1.0, 1e-6) << m.module;
    }
  }
}

TEST(ResizeGolden, RankNIsTheOptimalApproximation) {
  const std::string dir = test::temp_dir("resize_n");
  const std::string c = "lora", base = golden(c, "base.safetensors");
  auto report = resize(golden(c, "adapter.safetensors"), dir + "/r1.safetensors", dim(1));
  auto got = merged_with(dir + "/r1.safetensors", base);
  auto b = io::SafetensorsFile::open(base);
  auto merged = io::SafetensorsFile::open(golden(c, "merged_m1.safetensors"));
  std::map<std::string, double> energy;
  for (const auto& m : report.modules) energy[m.module] = m.retained_energy;
  for (const auto& [key, W] : got) {
    auto D = (merged.tensor(key, torch::kFloat64) - b.tensor(key, torch::kFloat64));
    auto s = torch::linalg_svdvals(D.reshape({D.size(0), -1}));
    const double tail = s.narrow(0, 1, s.size(0) - 1).square().sum().sqrt().item<double>();
    const double err = ((W.to(torch::kFloat64) - b.tensor(key, torch::kFloat64)) - D).norm().item<double>();
    EXPECT_NEAR(err, tail, 2e-5 * D.norm().item<double>() + 1e-6) << key;
    // the reported retained energy is σ_1² / Σσ² of the original ΔW
    std::string module = "lycoris_" + key.substr(0, key.size() - 7);
    std::replace(module.begin(), module.end(), '.', '_');
    ASSERT_TRUE(energy.count(module)) << module;
    EXPECT_NEAR(energy[module], (s[0].square() / s.square().sum()).item<double>(), 1e-5) << module;
  }
  // alpha keeps the scale s = alpha / r: golden linear modules have alpha 2 at rank 4 → alpha' = 0.5 at rank 1
  auto f = io::SafetensorsFile::open(dir + "/r1.safetensors");
  EXPECT_NEAR(f.tensor("lycoris_blocks_0_attn_to_q.alpha", torch::kFloat64).item<double>(), 0.5, 1e-7);
  EXPECT_EQ(f.tensor("lycoris_blocks_0_attn_to_q.lora_down.weight").sizes(), torch::IntArrayRef({1, 16}));
  EXPECT_EQ(f.tensor("lycoris_down_0_conv1.lora_down.weight").sizes(), torch::IntArrayRef({1, 4, 3, 3}));
  EXPECT_EQ(f.tensor("lycoris_down_0_conv1.lora_up.weight").sizes(), torch::IntArrayRef({16, 1, 1, 1}));
}

TEST(ResizeRules, RatioThresholdAndDimOnKnownSingularValues) {
  torch::manual_seed(7);
  // ΔW = U diag(4, 2, 1, 0.5) Vᵀ stored as up = U·σ, down = Vᵀ, alpha = r (s = 1)
  auto U = std::get<0>(torch::linalg_qr(torch::randn({10, 4})));
  auto V = std::get<0>(torch::linalg_qr(torch::randn({12, 4})));
  auto sig = torch::tensor({4.0f, 2.0f, 1.0f, 0.5f});
  TensorMap t{{"lora_up.weight", U * sig.unsqueeze(0)}, {"lora_down.weight", V.t().contiguous()},
              {"alpha", torch::tensor(4.0f)}};
  auto rank_for = [&](RankRule rule) {
    ResizeModuleReport r;
    resize_lora_module("m", t, rule, r);
    return r;
  };
  EXPECT_EQ(rank_for({RankMode::Threshold, 1.5}).new_rank, 2);
  EXPECT_EQ(rank_for({RankMode::Threshold, 1.0}).new_rank, 2);  // strict
  EXPECT_EQ(rank_for({RankMode::Ratio, 0.3}).new_rank, 2);      // σ > 1.2
  EXPECT_EQ(rank_for({RankMode::Ratio, 0.2}).new_rank, 3);      // σ > 0.8
  EXPECT_EQ(rank_for({RankMode::Ratio, 0.99}).new_rank, 1);
  EXPECT_EQ(rank_for({RankMode::Threshold, 10}).new_rank, 1);   // at least one
  auto r3 = rank_for({RankMode::Fixed, 3});
  EXPECT_EQ(r3.new_rank, 3);
  EXPECT_NEAR(r3.retained_energy, 21.0 / 21.25, 1e-6);
  auto big = rank_for({RankMode::Fixed, 9});
  EXPECT_EQ(big.new_rank, 4);
  EXPECT_NE(big.note.find("kept"), std::string::npos);
  // the rank-2 module rebuilds U_2 Σ_2 V_2ᵀ
  ResizeModuleReport r;
  auto out = resize_lora_module("m", t, {RankMode::Fixed, 2}, r);
  TensorMap m(out.begin(), out.end());
  const double s = m.at("alpha").item<double>() / 2;
  auto dw = m.at("lora_up.weight").matmul(m.at("lora_down.weight")) * s;
  auto best = (U.narrow(1, 0, 2) * sig.narrow(0, 0, 2).unsqueeze(0)).matmul(V.narrow(1, 0, 2).t());
  EXPECT_TRUE(test::all_close(dw, best, 1e-5, 1e-4, "rank-2 ΔW"));
}

TEST(ResizeGolden, OtherAlgorithmsAreCopied) {
  const std::string dir = test::temp_dir("resize_copy");
  auto report = resize(golden("loha", "adapter.safetensors"), dir + "/l.safetensors", dim(1));
  EXPECT_EQ(report.resized, 0u);
  EXPECT_GT(report.copied, 0u);
  for (const auto& m : report.modules) EXPECT_NE(m.note.find("copied unchanged"), std::string::npos);
  auto a = io::SafetensorsFile::open(golden("loha", "adapter.safetensors"));
  auto b = io::SafetensorsFile::open(dir + "/l.safetensors");
  ASSERT_EQ(a.names().size(), b.names().size());
  for (const auto& n : a.names()) EXPECT_TRUE(torch::equal(a.tensor(n), b.tensor(n))) << n;
}

TEST(ResizeErrors, BadInputsAndCli) {
  const std::string dir = test::temp_dir("resize_errors");
  const std::string in = golden("lora", "adapter.safetensors"), out = dir + "/o.safetensors";
  EXPECT_THROW(resize(in, out, dim(0)), OptionError);
  ResizeOptions o;
  o.rule = {RankMode::Ratio, 2};
  EXPECT_THROW(resize(in, out, o), OptionError);
  o.rule = {RankMode::Threshold, -1};
  EXPECT_THROW(resize(in, out, o), OptionError);
  o.rule = {RankMode::Quantile, 0.5};
  EXPECT_THROW(resize(in, out, o), OptionError);
  // a module without lora_down
  io::save_file(dir + "/bad.safetensors", {{"m.lora_up.weight", torch::ones({4, 2})}, {"m.alpha", torch::tensor(1.0f)}});
  try {
    resize(dir + "/bad.safetensors", out, dim(1));
    ADD_FAILURE() << "no error";
  } catch (const KeyError& e) {
    EXPECT_NE(std::string(e.what()).find("m"), std::string::npos);
  }
  // inconsistent ranks
  io::save_file(dir + "/shape.safetensors",
                {{"m.lora_up.weight", torch::ones({4, 2})}, {"m.lora_down.weight", torch::ones({3, 5})}});
  EXPECT_THROW(resize(dir + "/shape.safetensors", out, dim(1)), ShapeError);
  EXPECT_FALSE(std::filesystem::exists(out));
  const auto r = run_cli({"resize", in, "-o", out, "--dim", "0"});
  EXPECT_EQ(r.code, 2);  // a usage error
  EXPECT_EQ(r.err.rfind("lycoris: error: ", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(run_cli({"resize", dir + "/bad.safetensors", "-o", out, "--dim", "1"}).code, 1);
  EXPECT_EQ(run_cli({"resize", in, "-o", out, "--ratio", "1.5"}).code, 2);
  EXPECT_NE(run_cli({"resize", in, "-o", out, "--dim", "2", "--ratio", "0.5"}).code, 0);
  EXPECT_EQ(run_cli({"resize", in, "-o", out}).code, 2);
  EXPECT_FALSE(std::filesystem::exists(out));
  EXPECT_EQ(run_cli({"resize", in, "-o", out, "--dim", "2"}).code, 0);
  EXPECT_TRUE(std::filesystem::exists(out));
}

// ---------------------------------------------------------------- non-finite values, torch errors, bad inputs

// `resize IN -o OUT_DIR/o.safetensors ARGS` must fail with exit 1 and one stderr line holding every one of
// `expected`, leaving OUT_DIR empty.
void expect_one_line_error(const std::string& in, const std::string& args, const std::vector<std::string>& expected) {
  const std::string out_dir = test::temp_dir("resize_fail_out");
  const auto r = run_cli(with_words({"resize", in, "-o", out_dir + "/o.safetensors"}, args));
  EXPECT_EQ(r.code, 1) << in;
  EXPECT_EQ(r.err.rfind("lycoris: error: ", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  for (const auto& e : expected) EXPECT_NE(r.err.find(e), std::string::npos) << "'" << e << "' not in: " << r.err;
  EXPECT_EQ(test::listing(out_dir).size(), 0u) << in;  // nothing left in the output directory
}

TEST(ResizeNonFinite, NaNOrInfInputIsAOneLineErrorNamingFileModuleAndKey) {
  const std::string dir = test::temp_dir("resize_nonfinite");
  torch::manual_seed(3);
  auto up = torch::randn({8, 2}), down = torch::randn({2, 6});
  auto inf_up = up.clone(), nan_ds = torch::ones({8, 1});
  inf_up[1][1] = INFINITY;
  nan_ds[3][0] = NAN;
  auto neg_inf_h = up.to(torch::kFloat16), nan_bf = down.to(torch::kBFloat16);
  neg_inf_h[7][0] = -INFINITY;
  nan_bf[0][5] = NAN;
  const std::vector<std::tuple<std::string, NamedTensors, std::string>> cases{
      {"inf_up", {{"m.lora_up.weight", inf_up}, {"m.lora_down.weight", down}, {"m.alpha", torch::tensor(1.0f)}},
       "m.lora_up.weight"},
      {"nan_alpha", {{"m.lora_up.weight", up}, {"m.lora_down.weight", down}, {"m.alpha", torch::tensor(NAN)}},
       "m.alpha"},
      {"neg_inf_f16", {{"m.lora_up.weight", neg_inf_h}, {"m.lora_down.weight", down.to(torch::kFloat16)}},
       "m.lora_up.weight"},
      {"nan_bf16", {{"m.lora_up.weight", up.to(torch::kBFloat16)}, {"m.lora_down.weight", nan_bf}},
       "m.lora_down.weight"},
      {"nan_dora", {{"m.lora_up.weight", up}, {"m.lora_down.weight", down}, {"m.dora_scale", nan_ds}},
       "m.dora_scale"},
      // a module resize copies (LoHa) is checked too: the output must hold finite values only
      {"nan_loha",
       {{"m.hada_w1_a", torch::full({8, 2}, NAN)}, {"m.hada_w1_b", down}, {"m.hada_w2_a", up}, {"m.hada_w2_b", down}},
       "m.hada_w1_a"}};
  for (const auto& [name, tensors, key] : cases) {
    SCOPED_TRACE(name);
    const std::string in = dir + "/" + name + ".safetensors";
    io::save_file(in, tensors);
    expect_one_line_error(in, "--dim 1", {in + ": m: tensor '" + key + "'", "NaN/Inf"});
  }
}

TEST(ResizeNonFinite, FactorsNearTheF32LimitGiveFiniteExactFactors) {
  // ΔW = up·down with |up| ≈ 3e38: finite input whose F32 QR/SVD would overflow; the balanced factors fit F32
  const std::string dir = test::temp_dir("resize_huge");
  torch::manual_seed(5);
  auto up = torch::randn({8, 2}).sign() * 3e38, down = torch::randn({2, 6});
  io::save_file(dir + "/in.safetensors",
                {{"m.lora_up.weight", up}, {"m.lora_down.weight", down}, {"m.alpha", torch::tensor(2.0f)}});
  const auto r = run_cli({"resize", dir + "/in.safetensors", "-o", dir + "/o.safetensors", "--dim", "2"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto f = io::SafetensorsFile::open(dir + "/o.safetensors");
  auto u = f.tensor("m.lora_up.weight"), d = f.tensor("m.lora_down.weight");
  EXPECT_EQ(u.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::isfinite(u).all().item<bool>() && torch::isfinite(d).all().item<bool>());
  const double s = f.tensor("m.alpha", torch::kFloat64).item<double>() / 2;
  auto got = u.to(torch::kFloat64).matmul(d.to(torch::kFloat64)) * s;
  auto want = up.to(torch::kFloat64).matmul(down.to(torch::kFloat64));
  EXPECT_LT((got - want).norm().item<double>(), 1e-5 * want.norm().item<double>());
}

TEST(ResizeNonFinite, F16OverflowAfterRoundingIsAnError) {
  // ΔW = 60000·60000·2 per element (4×4, rank 1): the balanced factors are ≈ 8.5e4 > 65504, the F16 limit
  const std::string dir = test::temp_dir("resize_f16");
  const auto h = torch::TensorOptions().dtype(torch::kFloat16);
  const std::string in = dir + "/in.safetensors";
  io::save_file(in, {{"m.lora_up.weight", torch::full({4, 2}, 60000, h)},
                     {"m.lora_down.weight", torch::full({2, 4}, 60000, h)},
                     {"m.alpha", torch::tensor(2.0, h)}});
  expect_one_line_error(in, "--dim 1", {in + ": m: lora_up.weight: values up to", "overflow F16"});
}

TEST(ResizeErrors, TorchErrorsAreOneLineNamingFileAndModule) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "needs a build where the cuda device fails";
  const std::string dir = test::temp_dir("resize_torch_error");
  const std::string in = dir + "/in.safetensors";
  io::save_file(in, {{"m.lora_up.weight", torch::randn({8, 2})}, {"m.lora_down.weight", torch::randn({2, 6})}});
  // the library on a device torch cannot use: torch's error (whose what() holds a C++ backtrace) in the
  // work on a module comes out as one line naming the file and the module
  ResizeOptions o = dim(1);
  o.device = torch::Device("cuda");
  try {
    resize(in, dir + "/o.safetensors", o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind(in + ": m: ", 0), 0u) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
  }
  EXPECT_EQ(test::listing(dir).size(), 1u);
  // the CLI refuses such a device before any work
  const auto r = run_cli({"resize", in, "-o", dir + "/o.safetensors", "--dim", "1", "--device", "cuda"});
  EXPECT_TRUE(r.code == 1 || r.code == 2) << r.code;
  EXPECT_EQ(r.err.rfind("lycoris: error: --device: 'cuda'", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(test::listing(dir).size(), 1u);
}

TEST(ResizeErrors, HostileModulesAreOneLineErrorsNamingFileModuleAndKey) {
  const std::string dir = test::temp_dir("resize_hostile");
  torch::manual_seed(11);
  auto up = torch::randn({8, 2}), down = torch::randn({2, 6});
  const auto i8 = torch::TensorOptions().dtype(torch::kInt8);
  const std::vector<std::tuple<std::string, NamedTensors, std::string>> cases{
      // integer / bool factors would be written back as integers or bools
      {"i8", {{"m.lora_up.weight", torch::ones({8, 2}, i8)}, {"m.lora_down.weight", torch::ones({2, 6}, i8)}},
       ": m: tensor 'm.lora_up.weight' has dtype I8"},
      {"bool", {{"m.lora_up.weight", up}, {"m.lora_down.weight", torch::ones({2, 6}, torch::kBool)}},
       ": m: tensor 'm.lora_down.weight' has dtype BOOL"},
      {"mid_i8",
       {{"m.lora_up.weight", up.reshape({8, 2, 1, 1})},
        {"m.lora_down.weight", down.reshape({2, 6, 1, 1})},
        {"m.lora_mid.weight", torch::ones({2, 2, 3, 3}, i8)}},
       ": m: tensor 'm.lora_mid.weight' has dtype I8"},
      {"one_dim", {{"m.lora_up.weight", torch::randn({8})}, {"m.lora_down.weight", down}}, ": m: lora_up.weight [8]"},
      {"alpha_vec", {{"m.lora_up.weight", up}, {"m.lora_down.weight", down}, {"m.alpha", torch::ones({3})}},
       ": m.alpha: expected a single value"},
      {"seven_dims",
       {{"m.lora_up.weight", up.reshape({8, 2, 1, 1, 1, 1, 1})}, {"m.lora_down.weight", down.reshape({2, 6, 1, 1, 1, 1, 1})}},
       ": m: cannot infer a layer"}};
  for (const auto& [name, tensors, expected] : cases) {
    SCOPED_TRACE(name);
    const std::string in = dir + "/" + name + ".safetensors";
    io::save_file(in, tensors);
    expect_one_line_error(in, "--dim 1", {in + expected});
  }
}

TEST(ResizeErrors, DegenerateButValidModules) {
  const std::string dir = test::temp_dir("resize_degenerate");
  torch::manual_seed(12);
  // rank 8 above both dims (3 × 2): ΔW has rank 2, resized to 1 like any other module
  auto up = torch::randn({3, 8}), down = torch::randn({8, 2});
  io::save_file(dir + "/big_rank.safetensors", {{"m.lora_up.weight", up}, {"m.lora_down.weight", down}});
  const auto r = run_cli({"resize", dir + "/big_rank.safetensors", "-o", dir + "/o.safetensors", "--dim", "1"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto f = io::SafetensorsFile::open(dir + "/o.safetensors");
  EXPECT_EQ(f.tensor("m.lora_down.weight").sizes(), torch::IntArrayRef({1, 2}));
  // empty factors (rank 0, no outputs, no inputs, an empty kernel): the loader refuses such modules, and
  // resize says so in one line naming the file and the module
  for (const auto& [name, u, d] : std::vector<std::tuple<std::string, torch::Tensor, torch::Tensor>>{
           {"rank0", torch::zeros({8, 0}), torch::zeros({0, 6})},
           {"out0", torch::zeros({0, 2}), torch::randn({2, 6})},
           {"in0", torch::randn({8, 2}), torch::zeros({2, 0})},
           {"kernel0", torch::randn({8, 2, 1, 1}), torch::zeros({2, 6, 0, 3})}}) {
    SCOPED_TRACE(name);
    const std::string in = dir + "/" + name + ".safetensors", out = dir + "/" + name + "_o.safetensors";
    io::save_file(in, {{"m.lora_up.weight", u}, {"m.lora_down.weight", d}, {"m.alpha", torch::tensor(1.0f)}});
    const auto e = run_cli({"resize", in, "-o", out, "--dim", "1"});
    EXPECT_EQ(e.code, 1) << e.err;
    EXPECT_EQ(e.err.rfind("lycoris: error: " + in + ": m", 0), 0u) << e.err;
    EXPECT_EQ(std::count(e.err.begin(), e.err.end(), '\n'), 1) << e.err;
    EXPECT_FALSE(std::filesystem::exists(out));
  }
}

TEST(ResizeErrors, BadOptionsAreOneLineOptionErrors) {
  const std::string dir = test::temp_dir("resize_options");
  const std::string in = golden("lora", "adapter.safetensors"), out = dir + "/o.safetensors";
  for (const auto& [args, expected] : std::vector<std::pair<std::string, std::string>>{
           {"--threshold nan", "--threshold: nan is not valid"},
           {"--threshold inf", "--threshold: inf is not valid for mode threshold (the threshold must be finite"},
           {"--ratio -0.5", "--ratio: -0.5 is not valid"},
           {"--dim -3", "--dim: -3 is not valid"},
           {"--dim 1 --threads -1", "--threads: must be ≥ 0"},
           {"--dim 1 --device nope", "--device: 'nope'"}}) {
    const auto r = run_cli(with_words({"resize", in, "-o", out}, args));
    EXPECT_TRUE(r.code == 1 || r.code == 2) << args << ": " << r.code;
    EXPECT_EQ(r.err.find("lycoris: error: " + expected), 0u) << args << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  EXPECT_THROW(resize(in, out, [] { auto o = dim(1); o.threads = -1; return o; }()), OptionError);
  EXPECT_FALSE(std::filesystem::exists(out));
}

TEST(ResizeErrors, UnwritableOutputFailsBeforeReadingTheInput) {
  const std::string dir = test::temp_dir("resize_output_path");
  // the input does not even exist: the output is checked first
  for (const auto& out : {std::string("/nonexistent/dir/x.safetensors"), dir}) {
    SCOPED_TRACE(out);
    try {
      resize(dir + "/missing.safetensors", out, dim(1));
      ADD_FAILURE() << "no error";
    } catch (const IOError& e) {
      EXPECT_EQ(std::string(e.what()).rfind(out + ": cannot write here: ", 0), 0u) << e.what();
    }
    const auto r = run_cli({"resize", golden("lora", "adapter.safetensors"), "-o", out, "--dim", "1"});
    EXPECT_EQ(r.code, 1);
    EXPECT_EQ(r.err.rfind("lycoris: error: " + out + ": cannot write here: ", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  EXPECT_EQ(test::listing(dir).size(), 0u);
}

}  // namespace resize_test
