// merge_bench: the compute stage of `lycoris merge` per tensor, at SD1.5 shapes (Google Benchmark).
//
//   flock /work/build.lock cmake --build build -j2 --target merge_bench
//   build/bench/merge_bench [--benchmark_filter=lokr]          (LYCORIS_BENCH_THREADS, default 2)
//
//   mm/<shape>                      the bare product up·down (rank 16), the floor of a LoRA rebuild
//   rebuild/<algo>/<shape>          W' = apply_weight(W, 1) on an fp32 W (what delta_bench measures)
//   merge_tensor/<algo>/<shape>     tools::merge_tensor on an fp16 W in place (read → fp32 → += ΔW → fp16),
//                                   the per-tensor work of the merge pipeline
//   convert/<shape>                 fp16 → fp32 → fp16 only: the floor of merge_tensor
// Adapters: registry-created, rank 16 / alpha 8, random parameters. The whole-file benchmark (wall,
// RSS and the I/O floor per algorithm) is bench/merge_bench.sh.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"
#include "lycoris/layer.hpp"
#include "tools/merge/merge_tensor.hpp"

namespace {

using namespace lycoris;

struct Shape {
  std::string name;
  LayerSpec layer;
};

std::vector<Shape> shapes() {
  return {{"linear_320x320", LayerSpec::linear(320, 320)},
          {"linear_1280to10240", LayerSpec::linear(1280, 10240)},
          {"conv_1280x1280x3x3", LayerSpec::conv(1280, 1280, {3, 3}, {1, 1}, {1, 1})}};
}

AdapterPtr make(const std::string& algo, const LayerSpec& l) {
  const auto& a = find_algorithm(algo);
  auto ad = a.create(l, AdapterOptions().algo(a.name).rank(16).alpha(8));
  torch::NoGradGuard g;
  for (auto& p : ad->parameters()) p.copy_(torch::randn_like(p) * 0.05);
  ad->eval();
  return ad;
}

void register_all() {
  for (const auto& s : shapes()) {
    const auto O = s.layer.out_features, Ik = s.layer.in_features * s.layer.kernel_numel();
    benchmark::RegisterBenchmark(("mm/" + s.name).c_str(), [O, Ik](benchmark::State& st) {
      auto up = torch::randn({O, 16}), down = torch::randn({16, Ik});
      for (auto _ : st) benchmark::DoNotOptimize(torch::mm(up, down).data_ptr());
    })->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("convert/" + s.name).c_str(), [s](benchmark::State& st) {
      auto W = (torch::randn(s.layer.weight_shape()) * 0.02).to(torch::kFloat16);
      for (auto _ : st) W.copy_(W.to(torch::kFloat32));
    })->Unit(benchmark::kMillisecond);
    for (const std::string algo : {"lora", "loha", "lokr", "ia3", "diag-oft"}) {
      benchmark::RegisterBenchmark(("rebuild/" + algo + "/" + s.name).c_str(), [algo, s](benchmark::State& st) {
        auto ad = make(algo, s.layer);
        auto W = torch::randn(s.layer.weight_shape()) * 0.02;
        torch::NoGradGuard g;
        for (auto _ : st) benchmark::DoNotOptimize(ad->apply_weight(W, 1.0).data_ptr());
      })->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("merge_tensor/" + algo + "/" + s.name).c_str(), [algo, s](benchmark::State& st) {
        auto ad = make(algo, s.layer);
        auto W = (torch::randn(s.layer.weight_shape()) * 0.02).to(torch::kFloat16);
        torch::NoGradGuard g;
        // m = 0: W stays the same from one iteration to the next, the work does not depend on m
        for (auto _ : st) tools::merge_tensor(W, W, {{ad.get(), 0.0, false}});
      })->Unit(benchmark::kMillisecond);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const char* t = std::getenv("LYCORIS_BENCH_THREADS");
  torch::set_num_threads(t ? std::atoi(t) : 2);
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
