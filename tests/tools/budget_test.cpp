// Budget mode of `lycoris extract` and `lycoris resize`: sizes with units, the allocation against brute force
// over every rank combination (its certificate, and exact optimality when every rank costs the same), files
// that never exceed the budget (header included), lower error than a fixed rank at the same size, `--algo auto`
// choosing LoKr for a Kronecker product, the JSON report, and clear errors for bad budgets.
#include <algorithm>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/tools/budget.hpp"
#include "lycoris/tools/extract.hpp"
#include "lycoris/tools/resize.hpp"
#include "test_util.hpp"

namespace budget_test {

using namespace lycoris;
using namespace lycoris::tools;
using lycoris::test::run_cli;
using lycoris::test::with_words;
namespace fs = std::filesystem;

// ---------------------------------------------------------------- sizes

TEST(BudgetSize, Units) {
  EXPECT_EQ(parse_byte_size("500000", "--budget"), 500000u);
  EXPECT_EQ(parse_byte_size("32M", "--budget"), 32000000u);
  EXPECT_EQ(parse_byte_size("32mb", "--budget"), 32000000u);
  EXPECT_EQ(parse_byte_size("32MiB", "--budget"), 32u << 20);
  EXPECT_EQ(parse_byte_size("1.5K", "--budget"), 1500u);
  EXPECT_EQ(parse_byte_size("2GiB", "--budget"), uint64_t{2} << 30);
  EXPECT_EQ(parse_byte_size("7B", "--budget"), 7u);
  for (const char* bad : {"", "0", "-5", "abc", "12XB", "0.1", "1.2.3", "M", "1e3", "3 M"}) {
    SCOPED_TRACE(bad);
    EXPECT_THROW(parse_byte_size(bad, "--budget"), OptionError);
  }
  try {
    parse_byte_size("12XB", "--budget");
  } catch (const OptionError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown unit 'XB'"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------- the allocation against brute force

using Layers = std::vector<std::vector<BudgetChoice>>;

// The least total error over every combination of one choice per layer within `budget` (+inf if none fits).
double brute_force(const Layers& layers, uint64_t budget) {
  double best = INFINITY;
  std::function<void(size_t, uint64_t, double)> walk = [&](size_t l, uint64_t cost, double error) {
    if (cost > budget) return;
    if (l == layers.size()) {
      best = std::min(best, error);
      return;
    }
    for (const auto& c : layers[l]) walk(l + 1, cost + c.cost, error + c.error);
  };
  walk(0, 0, 0);
  return best;
}

// LoCon choices of random (O, I) matrices: dropped, or rank r at fixed + r·(O + I)·2 bytes, error Σ_{i>r} σ_i².
Layers locon_layers(const std::vector<std::pair<int64_t, int64_t>>& shapes, const std::vector<uint64_t>& fixed,
                    uint64_t seed) {
  torch::manual_seed(seed);
  Layers layers;
  for (size_t l = 0; l < shapes.size(); ++l) {
    const auto [O, I] = shapes[l];
    // spectra of different decay per layer: a random matrix times a random power law
    auto M = torch::randn({O, I}, torch::kFloat64) * torch::rand({1, I}, torch::kFloat64).pow(3.0 * static_cast<double>(l + 1));
    auto S2 = torch::linalg_svdvals(M).square();
    const double total = S2.sum().item<double>();
    std::vector<BudgetChoice> c{{0, total}};
    double kept = 0;
    for (int64_t r = 1; r <= std::min(O, I); ++r) {
      kept += S2[r - 1].item<double>();
      c.push_back({fixed[l] + static_cast<uint64_t>(r * (O + I) * 2), std::max(0.0, total - kept)});
    }
    layers.push_back(c);
  }
  return layers;
}

void expect_consistent(const Layers& layers, const BudgetAllocation& a, uint64_t budget) {
  uint64_t cost = 0;
  double error = 0;
  for (size_t l = 0; l < layers.size(); ++l) cost += layers[l][a.choice[l]].cost, error += layers[l][a.choice[l]].error;
  EXPECT_EQ(a.cost, cost);
  EXPECT_NEAR(a.error, error, 1e-9 * (1 + error));
  EXPECT_LE(a.cost, budget);
  EXPECT_LE(a.certified_cost, a.cost);
  EXPECT_LE(a.error, a.certified_error + 1e-12);
}

TEST(BudgetAllocation, CertificateHoldsAgainstBruteForce) {
  // 4 layers with fixed costs (alpha + header entries) and different costs per rank: a knapsack
  const std::vector<std::pair<int64_t, int64_t>> shapes{{6, 5}, {4, 8}, {7, 3}, {5, 5}};
  size_t exact = 0, cases = 0;
  for (uint64_t seed : {1, 2, 3}) {
    const auto layers = locon_layers(shapes, {90, 130, 70, 110}, seed);
    uint64_t total = 0;
    for (const auto& l : layers) total += std::max_element(l.begin(), l.end(), [](auto& a, auto& b) {
                                             return a.cost < b.cost;
                                           })->cost;
    for (uint64_t budget = 0; budget <= total + 10; budget += 23) {
      SCOPED_TRACE("seed " + std::to_string(seed) + ", budget " + std::to_string(budget));
      const auto a = allocate_budget(layers, budget, "test");
      expect_consistent(layers, a, budget);
      // the walk's allocation is the best of all that cost no more than it
      const double at_certified = brute_force(layers, a.certified_cost);
      EXPECT_NEAR(a.certified_error, at_certified, 1e-9 * (1 + at_certified));
      // the optimum within the budget lies between the bound and our error
      const double opt = brute_force(layers, budget);
      EXPECT_LE(a.lower_bound, opt + 1e-9 * (1 + opt));
      EXPECT_GE(a.error, opt - 1e-9 * (1 + opt));
      ++cases;
      if (a.error <= opt + 1e-9 * (1 + opt)) ++exact;
    }
  }
  // with the fill, the greedy result is the optimum in most of these knapsacks
  EXPECT_GE(exact * 10, cases * 8) << exact << " of " << cases;
}

TEST(BudgetAllocation, ExactWhenEveryRankCostsTheSame) {
  // same shapes, no fixed cost: every rank step costs (O + I)·2 bytes, the gains are the σ²: taking the largest
  // σ² across layers is optimal at every budget
  const auto layers = locon_layers({{5, 6}, {5, 6}, {5, 6}}, {0, 0, 0}, 7);
  for (uint64_t budget = 0; budget <= 15 * 22 + 5; budget += 7) {
    SCOPED_TRACE(budget);
    const auto a = allocate_budget(layers, budget, "test");
    expect_consistent(layers, a, budget);
    const double opt = brute_force(layers, budget);
    EXPECT_NEAR(a.error, opt, 1e-9 * (1 + opt));
    EXPECT_NEAR(a.certified_error, opt, 1e-9 * (1 + opt));  // no fill needed
  }
}

TEST(BudgetAllocation, NotEnoughForTheCheapestChoices) {
  Layers layers{{{10, 1.0}, {20, 0.5}}, {{5, 2.0}}};
  EXPECT_THROW(allocate_budget(layers, 14, "--budget"), OptionError);
  const auto a = allocate_budget(layers, 15, "--budget");
  EXPECT_EQ(a.cost, 15u);
  EXPECT_EQ(a.choice, (std::vector<size_t>{0, 0}));
}

// ---------------------------------------------------------------- extract

// A (m, n) difference with singular values σ_i = scale·decay^i over `rank` terms.
torch::Tensor spectrum_delta(int64_t m, int64_t n, int64_t rank, double decay, double scale) {
  const int64_t k = std::min({rank, m, n});
  auto U = std::get<0>(torch::linalg_qr(torch::randn({m, k})));
  auto V = std::get<0>(torch::linalg_qr(torch::randn({n, k})));
  auto s = torch::pow(decay, torch::arange(k, torch::kFloat32)) * scale;
  return (U * s.unsqueeze(0)).matmul(V.t());
}

// base / tuned checkpoints whose layers' ΔW spectra differ: a fast and a slow decay, a conv, a layer with a bias.
std::pair<std::string, std::string> spectra_checkpoints(const std::string& dir) {
  torch::manual_seed(11);
  std::vector<std::pair<std::string, torch::Tensor>> base, tuned;
  auto add = [&](const std::string& key, const torch::Tensor& D, bool bias) {
    auto W = torch::randn(D.sizes()) * 0.1;
    base.emplace_back(key + ".weight", W);
    tuned.emplace_back(key + ".weight", W + D);
    if (bias) {
      auto b = torch::randn({D.size(0)});
      base.emplace_back(key + ".bias", b);
      tuned.emplace_back(key + ".bias", b + 0.01);
    }
  };
  add("fast", spectrum_delta(64, 48, 48, 0.5, 1.0), false);
  add("slow", spectrum_delta(32, 96, 32, 0.95, 0.3), false);
  add("conv", spectrum_delta(16, 72, 16, 0.8, 0.5).reshape({16, 8, 3, 3}), false);
  add("biased", spectrum_delta(40, 40, 40, 0.7, 0.8), true);
  io::save_file(dir + "/base.safetensors", base);
  io::save_file(dir + "/tuned.safetensors", tuned);
  return {dir + "/base.safetensors", dir + "/tuned.safetensors"};
}

ExtractOptions budget_options(uint64_t bytes, ExtractAlgo algo = ExtractAlgo::LoCon) {
  ExtractOptions o;
  o.budget_bytes = bytes;
  o.algo = algo;
  o.threads = 1;
  return o;
}

TEST(BudgetExtract, FileNeverExceedsTheBudget) {
  const auto dir = test::temp_dir("budget_extract_size");
  const auto [base, tuned] = spectra_checkpoints(dir);
  double previous = 2;
  for (uint64_t budget : {1500, 3000, 6000, 12000, 24000, 48000, 200000}) {
    SCOPED_TRACE(budget);
    const auto out = dir + "/out_" + std::to_string(budget) + ".safetensors";
    const auto r = extract(base, tuned, out, budget_options(budget));
    EXPECT_LE(fs::file_size(out), budget);
    EXPECT_EQ(fs::file_size(out), r.file_bytes);
    EXPECT_LE(r.budget_used, budget);
    EXPECT_LE(r.total_rel_error, previous + 1e-3);  // more bytes, less error
    previous = r.total_rel_error;
    uint64_t bytes = 0;
    for (const auto& l : r.layers) bytes += l.bytes;
    EXPECT_EQ(bytes, r.bytes_written);
    // the file reads back: every module the report lists is there
    auto f = io::SafetensorsFile::open(out);
    for (const auto& l : r.layers)
      if (l.form == "dropped") EXPECT_FALSE(f.contains(l.module + ".alpha") || f.contains(l.module + ".diff"));
      else EXPECT_TRUE(f.contains(l.module + ".alpha") || f.contains(l.module + ".diff")) << l.module;
  }
  EXPECT_LT(previous, 1e-3);  // 200 kB holds every layer exactly (fp16 rounding aside)
  // parameters instead of bytes
  auto o = budget_options(0);
  o.budget_params = 3000;
  const auto out = dir + "/params.safetensors";
  extract(base, tuned, out, o);
  uint64_t params = 0;
  const auto file = io::SafetensorsFile::open(out);
  for (const auto& t : file.tensors()) params += t.numel();
  EXPECT_LE(params, 3000u);
  EXPECT_GT(params, 2500u);
}

TEST(BudgetExtract, BeatsAFixedRankAtTheSameSize) {
  const auto dir = test::temp_dir("budget_extract_fixed");
  const auto [base, tuned] = spectra_checkpoints(dir);
  for (int64_t rank : {2, 4, 8}) {
    SCOPED_TRACE(rank);
    ExtractOptions fixed;
    fixed.linear_param = fixed.conv_param = static_cast<double>(rank);
    const auto rf = extract(base, tuned, dir + "/fixed.safetensors", fixed);
    const uint64_t size = fs::file_size(dir + "/fixed.safetensors");
    const auto rb = extract(base, tuned, dir + "/budget.safetensors", budget_options(size));
    EXPECT_LE(fs::file_size(dir + "/budget.safetensors"), size);
    EXPECT_LT(rb.total_rel_error, rf.total_rel_error);
  }
}

TEST(BudgetExtract, AutoPicksLoKrForAKroneckerProduct) {
  const auto dir = test::temp_dir("budget_extract_auto");
  torch::manual_seed(5);
  const auto kron = torch::kron(torch::randn({4, 4}), torch::randn({8, 8}));     // exactly W1 ⊗ W2 (32, 32)
  const auto rank1 = torch::randn({32, 1}).matmul(torch::randn({1, 32})) * 0.3;  // exactly rank 1
  io::save_file(dir + "/base.safetensors",
                {{"kron.weight", torch::zeros({32, 32})}, {"low.weight", torch::zeros({32, 32})}});
  io::save_file(dir + "/tuned.safetensors", {{"kron.weight", kron}, {"low.weight", rank1}});
  // LoKr stores the product in 1 + 16 + 64 values; LoCon needs rank 32 (2049 values) or the whole 32 × 32
  // difference (1024 values, 2048 bytes): neither fits in 1400 bytes
  const auto r = extract(dir + "/base.safetensors", dir + "/tuned.safetensors", dir + "/out.safetensors",
                         budget_options(1400, ExtractAlgo::Auto));
  EXPECT_LE(fs::file_size(dir + "/out.safetensors"), 1400u);
  ASSERT_EQ(r.layers.size(), 2u);
  for (const auto& l : r.layers) {
    SCOPED_TRACE(l.module);
    EXPECT_LT(l.rel_error, 2e-3);  // fp16 rounding only
    if (l.key == "kron.weight") EXPECT_EQ(l.algo, "lokr");
  }
  // LoCon alone cannot store the product within this budget
  const auto locon = extract(dir + "/base.safetensors", dir + "/tuned.safetensors", dir + "/locon.safetensors",
                             budget_options(1400));
  EXPECT_GT(locon.total_rel_error, 0.1);
}

TEST(BudgetExtract, CliJsonReport) {
  const auto dir = test::temp_dir("budget_extract_json");
  const auto [base, tuned] = spectra_checkpoints(dir);
  const auto out = dir + "/out.safetensors";
  auto res = run_cli(with_words({"extract", base, tuned, "-o", out}, "--budget 10K --json --threads 1"));
  ASSERT_EQ(res.code, 0) << res.err;
  auto j = nlohmann::json::parse(res.out);
  ASSERT_EQ(j.at("layers").size(), 4u);
  uint64_t bytes = 0;
  for (const auto& l : j.at("layers")) {
    for (const char* k : {"module", "algo", "form", "rank", "bytes", "params", "rel_error"})
      EXPECT_TRUE(l.contains(k)) << k;
    bytes += l.at("bytes").get<uint64_t>();
    EXPECT_GE(l.at("rel_error").get<double>(), 0.0);
    EXPECT_LE(l.at("rel_error").get<double>(), 1.0);
  }
  const auto& t = j.at("totals");
  EXPECT_EQ(t.at("tensor_bytes").get<uint64_t>(), bytes);
  EXPECT_EQ(t.at("file_bytes").get<uint64_t>(), fs::file_size(out));
  EXPECT_LE(fs::file_size(out), 10000u);
  EXPECT_EQ(t.at("budget").at("limit").get<uint64_t>(), 10000u);
  EXPECT_EQ(t.at("budget").at("unit"), "bytes");
  EXPECT_LE(t.at("budget").at("lower_rel_error").get<double>(), t.at("total_rel_error").get<double>() + 1e-3);
}

TEST(BudgetExtract, CliBadBudgets) {
  const auto dir = test::temp_dir("budget_extract_bad");
  const auto [base, tuned] = spectra_checkpoints(dir);
  const auto out = dir + "/out.safetensors";
  const std::vector<std::pair<std::string, std::string>> cases{
      {"--budget 0", "at least 1 byte"},
      {"--budget=-5", "must be positive"},
      {"--budget 12XB", "unknown unit"},
      {"--budget lots", "not a size"},
      {"--budget 100", "cannot hold even the file's header"},
      {"--budget-params 10", "too small for even one layer"},
      {"--budget 10K --budget-params 10", "excludes"},
      {"--budget 10K --mode ratio", "excludes"},
      {"--algo auto", "give --budget"},
      {"--budget 10K --tucker", "not available with a budget"}};
  for (const auto& [words, message] : cases) {
    SCOPED_TRACE(words);
    auto res = run_cli(with_words({"extract", base, tuned, "-o", out}, words));
    EXPECT_EQ(res.code, 2) << res.err;
    EXPECT_NE(res.err.find(message), std::string::npos) << res.err;
    EXPECT_FALSE(fs::exists(out));
  }
}

// ---------------------------------------------------------------- resize

// A LoRA adapter of rank 8 on modules whose ΔW spectra differ.
std::string lora_adapter(const std::string& dir) {
  torch::manual_seed(3);
  std::vector<std::pair<std::string, torch::Tensor>> t;
  const std::vector<std::tuple<std::string, int64_t, int64_t, double>> modules{
      {"lycoris_a", 48, 32, 0.3}, {"lycoris_b", 24, 64, 0.9}, {"lycoris_c", 40, 40, 0.6}};
  for (const auto& [name, O, I, decay] : modules) {
    auto scale = torch::pow(decay, torch::arange(8, torch::kFloat32));
    t.emplace_back(name + ".alpha", torch::tensor(4.0f));
    t.emplace_back(name + ".lora_down.weight", torch::randn({8, I}) * scale.unsqueeze(1));
    t.emplace_back(name + ".lora_up.weight", torch::randn({O, 8}));
  }
  io::save_file(dir + "/lora.safetensors", t);
  return dir + "/lora.safetensors";
}

TEST(BudgetResize, FileNeverExceedsTheBudgetAndBeatsAFixedRank) {
  const auto dir = test::temp_dir("budget_resize");
  const auto in = lora_adapter(dir);
  for (int64_t dim : {1, 2, 4}) {
    SCOPED_TRACE(dim);
    ResizeOptions fixed;
    fixed.rule = {RankMode::Fixed, static_cast<double>(dim)};
    const auto rf = resize(in, dir + "/fixed.safetensors", fixed);
    const uint64_t size = fs::file_size(dir + "/fixed.safetensors");
    ResizeOptions o;
    o.budget_bytes = size;
    const auto rb = resize(in, dir + "/budget.safetensors", o);
    EXPECT_LE(fs::file_size(dir + "/budget.safetensors"), size);
    EXPECT_EQ(fs::file_size(dir + "/budget.safetensors"), rb.file_bytes);
    EXPECT_GE(rb.retained_energy, rf.retained_energy);
  }
  for (uint64_t budget : {700, 1500, 3000, 6000}) {
    ResizeOptions o;
    o.budget_bytes = budget;
    const auto r = resize(in, dir + "/b.safetensors", o);
    EXPECT_LE(fs::file_size(dir + "/b.safetensors"), budget) << budget;
    for (const auto& m : r.modules)
      EXPECT_EQ(io::SafetensorsFile::open(dir + "/b.safetensors").contains(m.module + ".lora_up.weight"), !m.dropped);
  }
  auto res = run_cli({"resize", in, "-o", dir + "/tiny.safetensors", "--budget", "300"});
  EXPECT_EQ(res.code, 2) << res.err;
  EXPECT_NE(res.err.find("too small"), std::string::npos) << res.err;
  EXPECT_FALSE(fs::exists(dir + "/tiny.safetensors"));
  res = run_cli({"resize", in, "-o", dir + "/json.safetensors", "--budget", "2KiB", "--json"});
  ASSERT_EQ(res.code, 0) << res.err;
  auto j = nlohmann::json::parse(res.out);
  EXPECT_EQ(j.at("totals").at("file_bytes").get<uint64_t>(), fs::file_size(dir + "/json.safetensors"));
  EXPECT_LE(fs::file_size(dir + "/json.safetensors"), 2048u);
  EXPECT_EQ(j.at("modules").size(), 3u);
}

}  // namespace budget_test
