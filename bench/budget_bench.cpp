// budget_bench: `extract --budget` against the per-layer rank rules at the same file size, and `--algo auto`
// against LoCon alone, on SD1.5-shaped checkpoints (docs/tools.md#budget-bench). torch::set_num_threads(2),
// two layers in flight (threads = 2), fp16 outputs.
//
//   budget_bench [--budgets 8M,32M,128M] [--no-auto]
//
// Data (generated once into $LYCORIS_BENCH_TMP/budget, default /tmp/lycoris_budget_bench, 2 × 1.7 GB): the 391
// layers of bench/data/sd15_unet_layers.json, W ~ N(0, 0.02²); each of the 282 Linear/Conv2d layers changed by
// a synthetic ΔW whose spectrum differs from layer to layer (deterministic per layer index): σ_i = c·d^i over
// k terms with k ∈ {8, 16, 32, 64, 128}, decay d ∈ {0.75, 0.88, 0.95, 0.99} and size c making ‖ΔW‖ =
// m·1 % of ‖W‖ with m ∈ {0.3, 1, 3}, plus noise of 0.5 % of ‖ΔW‖ (a full-rank floor, as real fine-tunes have).
// Not a real fine-tune: it is built so that no single rule suits every layer.
//
// For each budget B and each rule (fixed: --linear-dim/--conv-dim r; ratio; quantile, the same parameter for
// Linear and conv layers), the rule's parameter is the one whose file is the largest ≤ B (predicted from the
// layers' singular values, then checked by the real run); `--budget` is then given exactly that file's size.
// `--algo auto` and LoCon alone are compared at B itself. Every error is the tool's own total relative error
// sqrt(Σ‖D − ΔW‖² / Σ‖D‖²), ΔW read back from the written fp16 tensors.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "lycoris/functional/common.hpp"
#include "lycoris/functional/svd.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"
#include "lycoris/tools/budget.hpp"
#include "lycoris/tools/extract.hpp"
#include "sd15_layers.hpp"
#include "tools/extract/budget_plan.hpp"

namespace {

using namespace lycoris;
namespace F = lycoris::functional;
namespace fs = std::filesystem;

using Layer = bench::Sd15Layer;

fs::path bench_dir() {
  const char* d = std::getenv("LYCORIS_BENCH_TMP");
  return (d ? fs::path(d) : fs::path("/tmp/lycoris_budget_bench")) / "budget";
}

// ΔW of changed layer number `i` (rows, cols = I·k), its spectrum chosen by i (see the header comment).
torch::Tensor layer_delta(size_t i, int64_t rows, int64_t cols, double w_norm) {
  const int64_t ranks[] = {8, 16, 32, 64, 128};
  const double decays[] = {0.75, 0.88, 0.95, 0.99}, sizes[] = {0.3, 1.0, 3.0};
  const int64_t k = std::min({ranks[(i * 7 + 3) % 5], rows, cols});
  const double d = decays[(i * 5 + 1) % 4], m = sizes[(i * 11 + 2) % 3];
  auto U = std::get<0>(torch::linalg_qr(torch::randn({rows, k})));
  auto V = std::get<0>(torch::linalg_qr(torch::randn({cols, k})));
  auto s = torch::pow(d, torch::arange(k, torch::kFloat32));
  auto D = (U * s.unsqueeze(0)).matmul(V.t());
  D = D + torch::randn({rows, cols}) * (0.005 * D.norm().item<double>() / std::sqrt(double(rows * cols)));
  return D * (m * 0.01 * w_norm / D.norm().item<double>());
}

void ensure_checkpoints(const std::vector<Layer>& layers) {
  const auto dir = bench_dir();
  if (fs::exists(dir / "tuned.safetensors")) return;
  fs::create_directories(dir);
  std::printf("generating %s …\n", dir.c_str());
  torch::manual_seed(4321);
  std::vector<io::TensorDecl> decls;
  for (const auto& l : layers) {
    decls.push_back({l.module + ".weight", io::DType::F16, l.weight});
    if (!l.bias.empty()) decls.push_back({l.module + ".bias", io::DType::F16, l.bias});
  }
  io::SafetensorsWriter base((dir / "base.safetensors").string(), decls);
  io::SafetensorsWriter tuned((dir / "tuned.safetensors").string(), decls);
  size_t changed = 0;
  for (const auto& l : layers) {
    auto W = torch::randn(l.weight) * 0.02;
    torch::Tensor T = W;
    if (l.kind == "linear" || l.kind == "conv2d") {
      const int64_t O = l.weight[0];
      T = W + layer_delta(changed++, O, W.numel() / O, W.norm().item<double>()).reshape(l.weight);
    }
    base.write(l.module + ".weight", W.to(torch::kFloat16));
    tuned.write(l.module + ".weight", T.to(torch::kFloat16));
    if (!l.bias.empty()) {
      auto b = (torch::randn(l.bias) * 0.02).to(torch::kFloat16);
      base.write(l.module + ".bias", b);
      tuned.write(l.module + ".bias", b);
    }
  }
  base.commit();
  tuned.commit();
}

// A changed layer as the rules see it: its shape and the singular values extract's rules use.
struct Spectrum {
  std::string module;
  std::vector<int64_t> shape, bias_shape;
  torch::Tensor S;
};

std::vector<Spectrum> spectra(const std::vector<Layer>& layers) {
  auto base = io::SafetensorsFile::open((bench_dir() / "base.safetensors").string());
  auto tuned = io::SafetensorsFile::open((bench_dir() / "tuned.safetensors").string());
  std::vector<Spectrum> out;
  for (const auto& l : layers) {
    if (l.kind != "linear" && l.kind != "conv2d") continue;
    auto D = tuned.tensor(l.module + ".weight", torch::kFloat32) - base.tensor(l.module + ".weight", torch::kFloat32);
    out.push_back({tools::extract_module_name("lycoris", l.module), l.weight, l.bias,
                   F::singular_values_gram(F::flat(D))});
  }
  return out;
}

// The file a rule would write (extract_layer's rule: raw rank, clamp, full difference from r ≥ O/2), from the
// layouts of its layers; the metadata record is estimated (the real run checks the size).
uint64_t predicted_size(const std::vector<Spectrum>& layers, tools::RankMode mode, double p) {
  tools::ExtractOptions o;
  std::vector<io::TensorDecl> decls;
  for (const auto& l : layers) {
    const int64_t r = tools::clamp_rank(tools::select_rank(l.S, {mode, p}), l.shape[0], l.shape[1]);
    tools::LayerCandidate c;
    c.rank = r;
    c.diff = static_cast<double>(r) >= static_cast<double>(l.shape[0]) / 2.0;
    const auto bias = c.diff ? l.bias_shape : std::vector<int64_t>{};
    for (const auto& [suffix, t] : tools::candidate_layout(c, l.shape, bias, o))
      decls.push_back({l.module + "." + suffix, io::from_torch(t.scalar_type()), t.sizes().vec()});
  }
  return io::safetensors_size("predicted", decls, {{"lycoris_extract", std::string(120, 'x')}});
}

// The parameters tried per rule, the ones giving the largest files last.
std::vector<double> parameter_grid(tools::RankMode mode) {
  std::vector<double> grid;
  if (mode == tools::RankMode::Fixed)
    for (int r = 1; r <= 640; ++r) grid.push_back(r);
  else if (mode == tools::RankMode::Ratio)
    for (int k = 600; k >= 0; --k) grid.push_back(std::pow(10.0, -6.0 * (1.0 - k / 600.0)));  // 1 … 1e-6
  else
    for (int k = 0; k <= 1000; ++k) grid.push_back(k / 1000.0);
  return grid;
}

struct Run {
  uint64_t bytes = 0;
  double error = 0, seconds = 0;
};

Run run_extract(const tools::ExtractOptions& o, const std::string& name) {
  const auto dir = bench_dir();
  const auto out = (dir / (name + ".safetensors")).string();
  const auto t0 = std::chrono::steady_clock::now();
  auto r = tools::extract((dir / "base.safetensors").string(), (dir / "tuned.safetensors").string(), out, o);
  Run run{fs::file_size(out), r.total_rel_error,
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()};
  fs::remove(out);
  return run;
}

tools::ExtractOptions base_options() {
  tools::ExtractOptions o;
  o.threads = 2;
  return o;
}

std::string mb(uint64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f", static_cast<double>(bytes) / 1e6);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  std::string budgets_text = "8M,32M,128M";
  bool with_auto = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--budgets" && i + 1 < argc) budgets_text = argv[++i];
    else if (a == "--no-auto") with_auto = false;
    else {
      std::fprintf(stderr, "usage: budget_bench [--budgets 8M,32M,128M] [--no-auto]\n");
      return 2;
    }
  }
  try {
    torch::set_num_threads(2);
    const auto layers = bench::sd15_layers();
    ensure_checkpoints(layers);
    const auto t0 = std::chrono::steady_clock::now();
    const auto specs = spectra(layers);
    std::printf("spectra of %zu changed layers: %.1f s\n", specs.size(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    // predicted file size per parameter of each rule (independent of the budget)
    const std::vector<std::pair<tools::RankMode, const char*>> rules{
        {tools::RankMode::Fixed, "fixed"}, {tools::RankMode::Ratio, "ratio"}, {tools::RankMode::Quantile, "quantile"}};
    std::vector<std::vector<std::pair<uint64_t, double>>> predicted(rules.size());
    for (size_t k = 0; k < rules.size(); ++k) {
      for (double p : parameter_grid(rules[k].first))
        predicted[k].emplace_back(predicted_size(specs, rules[k].first, p), p);
      std::sort(predicted[k].begin(), predicted[k].end(), [](auto& a, auto& b) { return a.first > b.first; });
    }
    std::vector<std::string> rows;
    std::stringstream list(budgets_text);
    for (std::string item; std::getline(list, item, ',');) {
      const uint64_t B = tools::parse_byte_size(item, "--budgets");
      for (size_t k = 0; k < rules.size(); ++k) {
        const auto [mode, name] = rules[k];
        // the parameters whose predicted file is ≤ B, largest file first (at most 3 real runs)
        Run rule;
        double param = 0;
        int tries = 0;
        for (const auto& [size, p] : predicted[k]) {
          if (size > B) continue;
          if (tries++ == 3) break;
          auto o = base_options();
          o.mode = mode;
          o.linear_param = o.conv_param = p;
          rule = run_extract(o, "rule");
          param = p;
          if (rule.bytes <= B) break;
        }
        if (rule.bytes == 0 || rule.bytes > B) {
          std::printf("%s: no %s parameter gives a file ≤ %s MB\n", item.c_str(), name, mb(B).c_str());
          continue;
        }
        auto o = base_options();
        o.budget_bytes = rule.bytes;
        const Run budget = run_extract(o, "budget");
        char row[512];
        std::snprintf(row, sizeof row, "| %s | %s %g | %s | %.4f | %.1f s | %s | %.4f | %.1f s | %.1f %% |",
                      item.c_str(), name, param, mb(rule.bytes).c_str(), rule.error, rule.seconds,
                      mb(budget.bytes).c_str(), budget.error, budget.seconds,
                      100.0 * (budget.error - rule.error) / rule.error);
        rows.push_back(row);
        std::printf("%s\n", row);
        std::fflush(stdout);
      }
      auto o = base_options();
      o.budget_bytes = B;
      const Run locon = run_extract(o, "locon");
      char row[512];
      std::snprintf(row, sizeof row, "| %s | budget, LoCon | %s | %.4f | %.1f s |", item.c_str(),
                    mb(locon.bytes).c_str(), locon.error, locon.seconds);
      rows.push_back(row);
      std::printf("%s\n", row);
      if (with_auto) {
        o.algo = tools::ExtractAlgo::Auto;
        const Run autorun = run_extract(o, "auto");
        std::snprintf(row, sizeof row, "| %s | budget, --algo auto | %s | %.4f | %.1f s |", item.c_str(),
                      mb(autorun.bytes).c_str(), autorun.error, autorun.seconds);
        rows.push_back(row);
        std::printf("%s\n", row);
      }
      std::fflush(stdout);
    }
    std::printf("\n| budget | rule (parameter) | file MB | rule error | time | --budget file MB | --budget error | "
                "time | change |\n|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& r : rows) std::printf("%s\n", r.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "budget_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
