// `lycoris resize`: resizing a golden adapter to its full rank reproduces the golden merged checkpoint
// (LoRA, Tucker, DoRA, DyLoRA conv); a smaller rank gives the Eckart–Young error of the golden ΔW; the rank
// rules; non-LoRA modules are copied; clear errors and non-zero CLI exits.
#include <sys/wait.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/tools/resize.hpp"
#include "test_util.hpp"

namespace resize_test {

using namespace lycoris;
using namespace lycoris::tools;

int cli_code(const std::string& args, std::string* err_out = nullptr) {
  static const std::string dir = test::temp_dir("resize_cli");
  const std::string err = dir + "/err";
  int status = std::system((std::string("'") + LYCORIS_CLI + "' " + args + " >/dev/null 2>'" + err + "'").c_str());
  std::ifstream in(err);
  if (err_out) *err_out = std::string(std::istreambuf_iterator<char>(in), {});
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

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
  std::string err;
  EXPECT_EQ(cli_code("resize '" + in + "' -o '" + out + "' --dim 0", &err), 1);
  EXPECT_EQ(err.rfind("lycoris: error: ", 0), 0u) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_EQ(cli_code("resize '" + dir + "/bad.safetensors' -o '" + out + "' --dim 1"), 1);
  EXPECT_EQ(cli_code("resize '" + in + "' -o '" + out + "' --ratio 1.5"), 1);
  EXPECT_NE(cli_code("resize '" + in + "' -o '" + out + "' --dim 2 --ratio 0.5"), 0);
  EXPECT_EQ(cli_code("resize '" + in + "' -o '" + out + "'"), 1);
  EXPECT_FALSE(std::filesystem::exists(out));
  EXPECT_EQ(cli_code("resize '" + in + "' -o '" + out + "' --dim 2"), 0);
  EXPECT_TRUE(std::filesystem::exists(out));
}

}  // namespace resize_test
