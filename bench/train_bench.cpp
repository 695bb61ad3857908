// Train-step time (forward + backward + AdamW step + the per-step weight refresh) per algorithm on one fixed
// model: 4 blocks of Conv2d 3×3 at 320 channels, then 4 blocks of q/k/v/out/ff Linear at 320 (batch 4,
// 8×8 spatial = 64 tokens), in rebuild mode (unmodified torch layers) and bypass mode (drop-in
// lycoris::nn layers), against the same model without adapters. lycoris::set_num_threads(2).
//   ./build/bench/train_bench [--benchmark_filter=lokr]
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "bench_model.hpp"
#include "lycoris/network.hpp"
#include "lycoris/nn/layers.hpp"
#include "lycoris/threads.hpp"

namespace {

using lycoris::bench::BenchModelImpl;
using lycoris::bench::kBatch;
using lycoris::bench::kC;
using lycoris::bench::kHW;
using Plain = BenchModelImpl<torch::nn::Linear, torch::nn::Conv2d>;
using DropIn = BenchModelImpl<lycoris::nn::Linear, lycoris::nn::Conv2d>;

template <typename Model>
void run(benchmark::State& state, const std::string& algo, bool bypass) {
  torch::manual_seed(0);
  auto model = std::make_shared<Model>();
  const auto x = torch::randn({kBatch, kC, kHW, kHW});
  const auto target = torch::randn({kBatch, kHW * kHW, kC});
  lycoris::LycorisNetwork net{nullptr};
  std::vector<torch::Tensor> params;
  if (algo.empty()) {  // baseline: the model itself trained (same optimizer work per weight as Full)
    params = model->parameters();
  } else {
    auto module = lycoris::AdapterOptions().algo(algo).bypass_mode(bypass);
    if (algo == "lokr") module.factor(8);
    if (algo == "dylora") module.block_size(4);
    net = lycoris::create_lycoris(model, 1.0, 16, 8.0, lycoris::NetworkOptions().module(module));
    net->apply_to();
    params = net->parameters();
    for (auto& p : model->parameters()) p.requires_grad_(false);
  }
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-4));
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  for (auto _ : state) {
    auto loss = torch::mse_loss(model->forward(x), target);
    loss.backward();
    opt.step();
    opt.zero_grad();
    if (net) net->on_step();
  }
  state.counters["trainable_M"] = static_cast<double>(n) / 1e6;
  if (net) net->restore();
}

void register_all() {
  benchmark::RegisterBenchmark("no_adapter/frozen_forward_backward", [](benchmark::State& s) {
    torch::manual_seed(0);
    auto model = std::make_shared<Plain>();
    for (auto& p : model->parameters()) p.requires_grad_(false);
    const auto x = torch::randn({kBatch, kC, kHW, kHW}).requires_grad_(true);
    for (auto _ : s) {
      auto loss = model->forward(x).square().mean();
      loss.backward();
      x.mutable_grad().reset();
    }
  })->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("no_adapter/full_finetune", [](benchmark::State& s) { run<Plain>(s, "", false); })
      ->Unit(benchmark::kMillisecond);
  for (const std::string algo : {"lora", "loha", "lokr", "full", "ia3", "dylora", "glora", "glokr", "diag-oft", "boft"}) {
    benchmark::RegisterBenchmark((algo + "/rebuild").c_str(),
                                 [algo](benchmark::State& s) { run<Plain>(s, algo, false); })
        ->Unit(benchmark::kMillisecond);
    if (algo != "full")  // Full has no bypass mode
      benchmark::RegisterBenchmark((algo + "/bypass").c_str(),
                                   [algo](benchmark::State& s) { run<DropIn>(s, algo, true); })
          ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  lycoris::set_num_threads(2);  // deliberately fixed: comparable numbers on any machine
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
