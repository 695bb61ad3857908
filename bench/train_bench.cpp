// Train-step time (forward + backward + AdamW step + the per-step weight refresh) per algorithm on one fixed
// model: 4 blocks of Conv2d 3×3 at 320 channels, then 4 blocks of q/k/v/out/ff Linear at 320 (batch 4,
// 8×8 spatial = 64 tokens), in rebuild mode (unmodified torch layers) and bypass mode (drop-in
// lycoris::nn layers), against the same model without adapters. torch::set_num_threads(2).
//   ./build/bench/train_bench [--benchmark_filter=lokr]
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "lycoris/network.hpp"
#include "lycoris/nn/layers.hpp"

namespace {

constexpr int64_t kC = 320, kBatch = 4, kHW = 8, kBlocks = 4;

template <typename Linear, typename Conv2d>
struct BenchModelImpl : torch::nn::Module {
  std::vector<Conv2d> convs;
  std::vector<std::array<Linear, 5>> blocks;
  BenchModelImpl() {
    auto conv_list = register_module("convs", std::make_shared<torch::nn::Module>());
    for (int64_t i = 0; i < kBlocks; ++i)
      convs.push_back(conv_list->register_module(std::to_string(i),
                                                 Conv2d(torch::nn::Conv2dOptions(kC, kC, 3).padding(1))));
    auto list = register_module("blocks", std::make_shared<torch::nn::Module>());
    for (int64_t i = 0; i < kBlocks; ++i) {
      auto b = list->register_module(std::to_string(i), std::make_shared<torch::nn::Module>());
      std::array<Linear, 5> l = {Linear(nullptr), Linear(nullptr), Linear(nullptr), Linear(nullptr), Linear(nullptr)};
      const char* names[] = {"to_q", "to_k", "to_v", "to_out", "ff"};
      for (int j = 0; j < 5; ++j) l[j] = b->register_module(names[j], Linear(kC, kC));
      blocks.push_back(l);
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& c : convs) x = x + c(torch::silu(x));
    auto t = x.flatten(2).transpose(1, 2);  // [B, 64, C]
    for (auto& b : blocks) {
      auto q = b[0](t), k = b[1](t), v = b[2](t);
      auto a = torch::softmax(q.matmul(k.transpose(1, 2)) / std::sqrt(double(kC)), -1);
      t = t + b[3](a.matmul(v));
      t = t + b[4](torch::gelu(t));
    }
    return t;
  }
};

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
  torch::set_num_threads(2);  // deliberately fixed: comparable numbers on any machine
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
