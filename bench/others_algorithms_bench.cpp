// Full, (IA)^3, GLoRA, Diag-OFT, BOFT at SD-like shapes (fp32, CPU by default; LYCORIS_BENCH_DEVICE=cuda):
//   rebuild/<algo>/<shape>: W' = apply_weight(W, 1) (the merge / rebuild-mode cost per layer);
//   forward/<algo>/<shape>/{bypass,materialised}: the adapted layer's output for a batch of tokens
//   (Linear: 2×256 tokens; Conv2d: 1×C×32×32), without and with building W'.
// Adapters are created with random parameters (the cost does not depend on the values).
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "lycoris/modules/boft.hpp"
#include "lycoris/modules/diag_oft.hpp"
#include "lycoris/modules/full.hpp"
#include "lycoris/modules/glora.hpp"
#include "lycoris/modules/ia3.hpp"

namespace {

using namespace lycoris;

torch::Device device() {
  const char* d = std::getenv("LYCORIS_BENCH_DEVICE");
  return torch::Device(d ? d : "cpu");
}

struct Shape {
  std::string name;
  LayerSpec layer;
};

std::vector<Shape> shapes() {
  return {{"linear_320x320", LayerSpec::linear(320, 320)},
          {"linear_768to320", LayerSpec::linear(768, 320)},
          {"linear_1280to10240", LayerSpec::linear(1280, 10240)},
          {"conv_320x320x3x3", LayerSpec::conv(320, 320, {3, 3}, {1, 1}, {1, 1})},
          {"conv_1280x1280x3x3", LayerSpec::conv(1280, 1280, {3, 3}, {1, 1}, {1, 1})}};
}

struct Algo {
  std::string name;
  std::function<AdapterPtr(const LayerSpec&)> make;
};

std::vector<Algo> algos() {
  return {{"full", [](const LayerSpec& l) { return std::make_shared<FullImpl>(l); }},
          {"ia3", [](const LayerSpec& l) { return std::make_shared<IA3Impl>(l, IA3Options().algo("ia3")); }},
          {"glora", [](const LayerSpec& l) { return std::make_shared<GLoRAImpl>(l, GLoRAOptions().algo("glora").rank(8)); }},
          {"diag-oft",
           [](const LayerSpec& l) { return std::make_shared<DiagOFTImpl>(l, DiagOFTOptions().algo("diag-oft").rank(8)); }},
          {"boft", [](const LayerSpec& l) { return std::make_shared<BOFTImpl>(l, BOFTOptions().algo("boft").rank(16)); }}};
}

AdapterPtr prepared(const Algo& a, const LayerSpec& l) {
  auto ad = a.make(l);
  torch::NoGradGuard g;
  for (auto& p : ad->parameters()) p.copy_(torch::randn_like(p) * 0.01);
  ad->to(device());
  ad->eval();
  return ad;
}

torch::Tensor input_for(const LayerSpec& l) {
  auto o = torch::TensorOptions().device(device());
  return l.is_conv() ? torch::randn({1, l.in_features, 32, 32}, o) : torch::randn({2, 256, l.in_features}, o);
}

void sync() {
  if (device().is_cuda()) torch::cuda::synchronize();
}

void register_all() {
  for (const auto& a : algos()) {
    for (const auto& s : shapes()) {
      benchmark::RegisterBenchmark(("rebuild/" + a.name + "/" + s.name).c_str(), [a, s](benchmark::State& st) {
        auto ad = prepared(a, s.layer);
        auto W = torch::randn(s.layer.weight_shape(), torch::TensorOptions().device(device()));
        torch::NoGradGuard g;
        for (auto _ : st) {
          benchmark::DoNotOptimize(ad->apply_weight(W, 1.0));
          sync();
        }
      })->Unit(benchmark::kMillisecond);
      for (bool bypass : {true, false}) {
        benchmark::RegisterBenchmark(
            ("forward/" + a.name + "/" + s.name + (bypass ? "/bypass" : "/materialised")).c_str(),
            [a, s, bypass](benchmark::State& st) {
              auto ad = prepared(a, s.layer);
              auto o = torch::TensorOptions().device(device());
              auto W = torch::randn(s.layer.weight_shape(), o);
              auto b = torch::randn({s.layer.out_features}, o);
              auto x = input_for(s.layer);
              torch::NoGradGuard g;
              for (auto _ : st) {
                if (bypass)
                  benchmark::DoNotOptimize(ad->bypass_forward(x, W, b, 1.0));
                else
                  benchmark::DoNotOptimize(layer_forward(x, s.layer, ad->apply_weight(W, 1.0), ad->apply_bias(b, 1.0)));
                sync();
              }
            })
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
