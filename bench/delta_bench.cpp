// ΔW rebuild and bypass-vs-materialised forward for every algorithm of the registry, at SD-like shapes.
//   rebuild/<algo>/<shape>:   W' = apply_weight(W, 1) — the per-layer cost of a merge / rebuild-mode step
//   forward/<algo>/<shape>/bypass:       bypass_forward(x, W, b, 1) (ΔW never built where the algorithm allows)
//   forward/<algo>/<shape>/materialised: layer_forward(x, apply_weight(W, 1), apply_bias(b, 1))
// x = 4096 tokens for Linear (4096 × I), and 4096 positions (1 × I × 64 × 64) for Conv2d 320; the
// 1280-channel conv uses 1 × 1280 × 32 × 32 to keep a run under a few minutes on 2 cores.
// Adapters: created through the registry with rank 16 / alpha 8 (Diag-OFT block 16, BOFT 16), random
// parameters (the cost does not depend on the values). torch::set_num_threads(2). fp32 CPU, or
// LYCORIS_BENCH_DEVICE=cuda.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"
#include "lycoris/layer.hpp"

namespace {

using namespace lycoris;

torch::Device device() {
  const char* d = std::getenv("LYCORIS_BENCH_DEVICE");
  return torch::Device(d ? d : "cpu");
}

struct Shape {
  std::string name;
  LayerSpec layer;
  std::vector<int64_t> input;
};

std::vector<Shape> shapes() {
  return {{"linear_320x320", LayerSpec::linear(320, 320), {4096, 320}},
          {"linear_768to320", LayerSpec::linear(768, 320), {4096, 768}},
          {"linear_1280to10240", LayerSpec::linear(1280, 10240), {4096, 1280}},
          {"conv_320x320x3x3", LayerSpec::conv(320, 320, {3, 3}, {1, 1}, {1, 1}), {1, 320, 64, 64}},
          {"conv_1280x1280x3x3", LayerSpec::conv(1280, 1280, {3, 3}, {1, 1}, {1, 1}), {1, 1280, 32, 32}}};
}

AdapterOptions options_for(const Algorithm& a) {
  return AdapterOptions().algo(a.name).rank(16).alpha(8);
}

void sync() {
  if (device().is_cuda()) torch::cuda::synchronize();
}

// nullptr when the algorithm cannot wrap the layer with these options (reported as skipped).
AdapterPtr make(const Algorithm& a, const LayerSpec& l, std::string& why) {
  try {
    if (a.supports && !a.supports(l)) {
      why = "unsupported layer";
      return nullptr;
    }
    auto ad = a.create(l, options_for(a));
    torch::NoGradGuard g;
    for (auto& p : ad->parameters()) p.copy_(torch::randn_like(p) * 0.01);
    ad->to(device());
    ad->eval();
    return ad;
  } catch (const std::exception& e) {
    why = e.what();
    return nullptr;
  }
}

void register_all() {
  for (const auto& algo : algorithms()) {
    if (algo.name == "norm") continue;  // norm layers only (a vector add)
    for (const auto& s : shapes()) {
      const std::string tag = algo.name + "/" + s.name;
      const Algorithm* a = &algo;
      benchmark::RegisterBenchmark(("rebuild/" + tag).c_str(), [a, s](benchmark::State& st) {
        std::string why;
        auto ad = make(*a, s.layer, why);
        if (!ad) return st.SkipWithError(why.c_str());
        auto W = torch::randn(s.layer.weight_shape(), torch::TensorOptions().device(device()));
        torch::NoGradGuard g;
        for (auto _ : st) {
          auto Wp = ad->apply_weight(W, 1.0);
          sync();
          benchmark::DoNotOptimize(Wp.data_ptr());
        }
      })->Unit(benchmark::kMillisecond);
      for (const bool bypass : {true, false})
        benchmark::RegisterBenchmark(("forward/" + tag + (bypass ? "/bypass" : "/materialised")).c_str(),
                                     [a, s, bypass](benchmark::State& st) {
                                       std::string why;
                                       auto ad = make(*a, s.layer, why);
                                       if (!ad) return st.SkipWithError(why.c_str());
                                       auto o = torch::TensorOptions().device(device());
                                       auto W = torch::randn(s.layer.weight_shape(), o) * 0.05;
                                       auto b = torch::randn({s.layer.out_features}, o);
                                       auto x = torch::randn(s.input, o);
                                       torch::NoGradGuard g;
                                       for (auto _ : st) {
                                         auto y = bypass ? ad->bypass_forward(x, W, b, 1.0)
                                                         : layer_forward(x, s.layer, ad->apply_weight(W, 1.0),
                                                                         ad->apply_bias(b, 1.0));
                                         sync();
                                         benchmark::DoNotOptimize(y.data_ptr());
                                       }
                                     })
            ->Unit(benchmark::kMillisecond);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(2);
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
