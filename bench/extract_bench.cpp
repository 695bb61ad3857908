// extract / resize at SD1.5 scale (docs/tools.md#extract). torch::set_num_threads(2), fp32 CPU math.
//
//   svd/<method>/<shape>             top-16 SVD of a fine-tune-like ΔW (decaying spectrum σ_i = 0.93^i over
//                                    rank 96, plus 1 % noise): full LAPACK SVD vs randomized (p = 8, q = 2 / 4).
//                                    Counters: rel_err = ‖M − M_16‖/‖M‖, err_vs_full = rel_err / rel_err(full).
//   layer/<algo>/<shape>             extract_layer at rank 16 (locon auto SVD, loha 20 ALS sweeps, lokr).
//   sd15/extract/<algo>/<svd>        the whole tool on SD1.5-shaped checkpoints (391 layers from
//                                    bench/data/sd15_unet_layers.json; 282 Linear/Conv2d layers changed by a
//                                    rank-32 ΔW + noise, fp16 files of 1.7 GB each generated once into
//                                    $LYCORIS_BENCH_TMP (default /tmp/lycoris_extract_bench)): fixed rank 16
//                                    (ratio_0.1: σ > 0.1·σ_1), two layers in flight (threads = 2).
//   sd15/resize                      a rank-32 LoCon adapter for the 282 layers resized to rank 16.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lycoris/functional/svd.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"
#include "lycoris/tools/extract.hpp"
#include "lycoris/tools/resize.hpp"
#include "sd15_layers.hpp"

namespace {

using namespace lycoris;
namespace F = lycoris::functional;
namespace fs = std::filesystem;

using Layer = bench::Sd15Layer;

// A fine-tune-like difference of shape (O, I·k): rank-96 part with σ_i ∝ 0.93^i plus 1 % Gaussian noise.
torch::Tensor fine_tune_delta(int64_t rows, int64_t cols, int64_t rank = 96) {
  const int64_t r = std::min({rank, rows, cols});
  auto U = std::get<0>(torch::linalg_qr(torch::randn({rows, r})));
  auto V = std::get<0>(torch::linalg_qr(torch::randn({cols, r})));
  auto s = torch::pow(0.93, torch::arange(r, torch::kFloat32));
  auto D = (U * s.unsqueeze(0)).matmul(V.t());
  return D + torch::randn({rows, cols}) * (0.01 * D.norm().item<double>() / std::sqrt(double(rows * cols)));
}

struct Shape {
  std::string name;
  int64_t rows, cols;
};
const std::vector<Shape> kShapes = {{"320x320", 320, 320},
                                    {"1280x1280", 1280, 1280},
                                    {"320x2880_conv3x3", 320, 2880},
                                    {"1280x11520_conv3x3", 1280, 11520},
                                    {"10240x1280_ff", 10240, 1280}};

void BM_svd(benchmark::State& state, Shape shape, F::SVDMethod method, int64_t power_iters) {
  torch::set_num_threads(2);
  torch::manual_seed(1);
  auto M = fine_tune_delta(shape.rows, shape.cols);
  F::RandomizedOptions ro;
  ro.power_iters = power_iters;
  F::SVD svd;
  for (auto _ : state) {
    svd = F::svd_truncated(M, 16, method, ro);
    benchmark::DoNotOptimize(svd.S.data_ptr());
  }
  const double err = (M - svd.reconstruct()).norm().item<double>() / M.norm().item<double>();
  auto best = F::singular_values(M);
  const double opt = best.narrow(0, 16, best.size(0) - 16).square().sum().sqrt().item<double>() / M.norm().item<double>();
  state.counters["rel_err"] = err;
  state.counters["err_vs_full"] = err / opt;
}

void BM_layer(benchmark::State& state, Shape shape, tools::ExtractAlgo algo) {
  torch::set_num_threads(2);
  torch::manual_seed(2);
  auto D = fine_tune_delta(shape.rows, shape.cols);
  tools::ExtractOptions o;
  o.algo = algo;
  o.linear_param = 16;
  tools::LayerFit fit;
  for (auto _ : state) {
    fit = algo == tools::ExtractAlgo::LoCon ? tools::fit_locon(D, 16, o)
          : algo == tools::ExtractAlgo::LoHa ? tools::fit_loha(D, 16, o)
                                              : tools::fit_lokr(D, std::min<int64_t>(16, 16), o);
  }
  state.counters["rel_err"] = (tools::fit_delta(fit, D.sizes()) - D).norm().item<double>() / D.norm().item<double>();
}

fs::path bench_dir() {
  const char* d = std::getenv("LYCORIS_BENCH_TMP");
  return d ? fs::path(d) : fs::path("/tmp/lycoris_extract_bench");
}

// base / tuned SD1.5-shaped fp16 checkpoints (generated once) and a rank-32 LoCon adapter for resize.
void ensure_checkpoints() {
  const auto dir = bench_dir();
  if (fs::exists(dir / "tuned.safetensors") && fs::exists(dir / "locon_r32.safetensors")) return;
  fs::create_directories(dir);
  torch::manual_seed(1234);
  auto ls = bench::sd15_layers();
  std::vector<io::TensorDecl> decls;
  for (const auto& l : ls) {
    decls.push_back({l.module + ".weight", io::DType::F16, l.weight});
    if (!l.bias.empty()) decls.push_back({l.module + ".bias", io::DType::F16, l.bias});
  }
  io::SafetensorsWriter base((dir / "base.safetensors").string(), decls);
  io::SafetensorsWriter tuned((dir / "tuned.safetensors").string(), decls);
  std::vector<std::pair<std::string, torch::Tensor>> adapter;
  for (const auto& l : ls) {
    auto W = torch::randn(l.weight) * 0.02;
    torch::Tensor T = W;
    if (l.kind == "linear" || l.kind == "conv2d") {
      const int64_t O = l.weight[0], cols = W.numel() / O;
      auto D = fine_tune_delta(O, cols, 32) * (0.02 * std::sqrt(double(W.numel())) * 0.01);
      T = W + D.reshape(l.weight);
      const std::string name = naming::module_name("lora_unet", l.module);
      const int64_t r = std::min<int64_t>({32, O, l.weight[1]});
      std::vector<int64_t> up{O, r}, down{r, l.weight[1]};
      if (l.weight.size() == 4) up.insert(up.end(), {1, 1}), down.insert(down.end(), {l.weight[2], l.weight[3]});
      adapter.emplace_back(name + ".alpha", torch::tensor(16.0f).to(torch::kFloat16));
      adapter.emplace_back(name + ".lora_up.weight", (torch::randn(up) * 0.05).to(torch::kFloat16));
      adapter.emplace_back(name + ".lora_down.weight", (torch::randn(down) * 0.05).to(torch::kFloat16));
    }
    base.write(l.module + ".weight", W.to(torch::kFloat16));
    tuned.write(l.module + ".weight", T.to(torch::kFloat16));
    if (!l.bias.empty()) {
      auto b = torch::randn(l.bias) * 0.02;
      base.write(l.module + ".bias", b.to(torch::kFloat16));
      tuned.write(l.module + ".bias", b.to(torch::kFloat16));
    }
  }
  base.commit();
  tuned.commit();
  io::save_file((dir / "locon_r32.safetensors").string(), adapter);
}

void BM_sd15_extract(benchmark::State& state, tools::ExtractAlgo algo, F::SVDMethod svd, tools::RankMode mode) {
  torch::set_num_threads(2);
  ensure_checkpoints();
  const auto dir = bench_dir();
  tools::ExtractOptions o;
  o.algo = algo;
  o.svd = svd;
  o.threads = 2;  // two layers in flight, one thread each
  o.mode = mode;
  // fixed rank 16, or σ > 0.1·σ_1 (the rank-32 part decays as 0.93^i: ~32 ranks pass)
  o.linear_param = o.conv_param = mode == tools::RankMode::Fixed ? 16 : 0.1;
  o.prefix = "kohya";
  tools::ExtractReport r;
  for (auto _ : state)
    r = tools::extract((dir / "base.safetensors").string(), (dir / "tuned.safetensors").string(),
                       (dir / "out.safetensors").string(), o);
  fs::remove(dir / "out.safetensors");
  state.counters["layers"] = static_cast<double>(r.layers.size());
  state.counters["total_rel_err"] = r.total_rel_error;
  state.counters["MB_out"] = static_cast<double>(r.bytes_written) / 1e6;
}

void BM_sd15_resize(benchmark::State& state) {
  torch::set_num_threads(2);
  ensure_checkpoints();
  const auto dir = bench_dir();
  tools::ResizeOptions o;
  o.rule = {tools::RankMode::Fixed, 16};
  tools::ResizeReport r;
  for (auto _ : state)
    r = tools::resize((dir / "locon_r32.safetensors").string(), (dir / "resized.safetensors").string(), o);
  fs::remove(dir / "resized.safetensors");
  state.counters["modules"] = static_cast<double>(r.resized);
  state.counters["retained_energy"] = r.retained_energy;
}

int register_all() {
  for (const auto& s : kShapes) {
    benchmark::RegisterBenchmark(("svd/full/" + s.name).c_str(), BM_svd, s, F::SVDMethod::Full, 0)
        ->Unit(benchmark::kMillisecond)->Iterations(s.rows * s.cols > 4000000 ? 1 : 3)->UseRealTime();
    for (int64_t q : {2, 4})
      benchmark::RegisterBenchmark(("svd/randomized_q" + std::to_string(q) + "/" + s.name).c_str(), BM_svd, s,
                                   F::SVDMethod::Randomized, q)
          ->Unit(benchmark::kMillisecond)->Iterations(3)->UseRealTime();
  }
  for (const auto& s : kShapes) {
    for (auto [name, algo] : {std::pair{"locon", tools::ExtractAlgo::LoCon}, {"loha", tools::ExtractAlgo::LoHa},
                              {"lokr", tools::ExtractAlgo::LoKr}})
      benchmark::RegisterBenchmark((std::string("layer/") + name + "/" + s.name).c_str(), BM_layer, s, algo)
          ->Unit(benchmark::kMillisecond)->Iterations(1)->UseRealTime();
  }
  const auto fixed = tools::RankMode::Fixed;
  benchmark::RegisterBenchmark("sd15/extract/locon/randomized", BM_sd15_extract, tools::ExtractAlgo::LoCon,
                               F::SVDMethod::Auto, fixed)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
  benchmark::RegisterBenchmark("sd15/extract/locon/full_svd", BM_sd15_extract, tools::ExtractAlgo::LoCon,
                               F::SVDMethod::Full, fixed)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
  benchmark::RegisterBenchmark("sd15/extract/locon/ratio_0.1", BM_sd15_extract, tools::ExtractAlgo::LoCon,
                               F::SVDMethod::Auto, tools::RankMode::Ratio)
      ->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
  benchmark::RegisterBenchmark("sd15/extract/lokr/auto", BM_sd15_extract, tools::ExtractAlgo::LoKr,
                               F::SVDMethod::Auto, fixed)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
  benchmark::RegisterBenchmark("sd15/extract/loha/auto", BM_sd15_extract, tools::ExtractAlgo::LoHa,
                               F::SVDMethod::Auto, fixed)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
  benchmark::RegisterBenchmark("sd15/resize/r32_to_16", BM_sd15_resize)
      ->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
  return 0;
}
const int registered = register_all();

}  // namespace

BENCHMARK_MAIN();
