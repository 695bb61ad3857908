// TorchScript hosts (lycoris/jit.hpp): the train step of train_bench's model as a TorchScript module against
// the same torch::nn model (rebuild mode both; the TorchScript one with the graph executor's optimizer on, as
// by default, and off in lycoris::torchscript::TrainingScope), and the cost of switching between two adapter
// files on a TorchScript model of 100 Linear layers against recomputing those layers' weights once
// (refresh). torch::set_num_threads(2), or LYCORIS_BENCH_THREADS.
//   ./build/bench/jit_bench [--benchmark_filter=switch]
#include <benchmark/benchmark.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>

#include "bench_model.hpp"
#include "lycoris/jit.hpp"
#include "lycoris/network.hpp"

namespace {

using lycoris::bench::kBatch;
using lycoris::bench::kC;
using lycoris::bench::kHW;
using Plain = lycoris::bench::BenchModelImpl<torch::nn::Linear, torch::nn::Conv2d>;

// The TorchScript twin of a bench model, with copies of its parameters: TorchScript code for every forward
// and the torch.nn class names a model scripted in PyTorch has, so the host view finds the same layers.
// (Code defined from C++ calls submodules by .forward: only Python's frontend sugars module calls.)
torch::jit::Module scripted_twin(Plain& nn) {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  auto make = [&](const std::string& cls) {
    torch::jit::Module m(c10::QualifiedName("__torch__." + cls), cu, /*shouldMangle=*/true);
    m.register_attribute("training", c10::BoolType::get(), true);
    return m;
  };
  auto params = nn.named_parameters();
  auto layer = [&](const std::string& cls, const std::string& path, const std::string& call) {
    auto m = make(cls);
    m.register_parameter("weight", params[path + ".weight"].detach().clone().requires_grad_(true), false);
    m.register_parameter("bias", params[path + ".bias"].detach().clone().requires_grad_(true), false);
    m.define("def forward(self, x):\n  return " + call + "\n");
    return m;
  };
  char scale[64];
  std::snprintf(scale, sizeof scale, "%.17g", std::sqrt(static_cast<double>(kC)));
  auto root = make("BenchModel"), convs = make("Convs"), blocks = make("Blocks");
  std::string code = "def forward(self, x):\n";
  for (size_t i = 0; i < nn.convs.size(); ++i) {
    const auto n = std::to_string(i);
    convs.register_module(n, layer("torch.nn.modules.conv.Conv2d", "convs." + n,
                                   "torch.conv2d(x, self.weight, self.bias, [1, 1], [1, 1], [1, 1], 1)"));
    code += "  x = x + getattr(self.convs, \"" + n + "\").forward(torch.silu(x))\n";
  }
  code += "  t = torch.transpose(torch.flatten(x, 2), 1, 2)\n";
  for (size_t i = 0; i < nn.blocks.size(); ++i) {
    const auto n = std::to_string(i);
    auto block = make("Block");
    for (const char* name : {"to_q", "to_k", "to_v", "to_out", "ff"})
      block.register_module(name, layer("torch.nn.modules.linear.Linear", "blocks." + n + "." + name,
                                        "torch.linear(x, self.weight, self.bias)"));
    block.define(std::string("def forward(self, t):\n") +
                 "  q = self.to_q.forward(t)\n  k = self.to_k.forward(t)\n  v = self.to_v.forward(t)\n"
                 "  a = torch.softmax(torch.matmul(q, torch.transpose(k, 1, 2)) / " + scale + ", -1)\n"
                 "  t = t + self.to_out.forward(torch.matmul(a, v))\n"
                 "  return t + self.ff.forward(torch.gelu(t))\n");
    blocks.register_module(n, block);
    code += "  t = getattr(self.blocks, \"" + n + "\").forward(t)\n";
  }
  root.register_module("convs", convs);
  root.register_module("blocks", blocks);
  root.define(code + "  return t\n");
  return root;
}

lycoris::AdapterOptions algo_options(const std::string& algo) {
  auto module = lycoris::AdapterOptions().algo(algo);
  if (algo == "lokr") module.factor(8);
  return module;
}

// One train step (forward, backward, AdamW, on_step) of `algo` in rebuild mode; empty algo: the frozen model's
// forward and backward alone.
enum class Host { TorchNn, TorchScript, TorchScriptTrainingScope };

void train_step(benchmark::State& state, const std::string& algo, Host host) {
  // the graph executor's optimizations (profiling, autodiff subgraphs) cost training time; TrainingScope turns
  // them off (docs/training.md#torchscript-speed)
  std::optional<lycoris::torchscript::TrainingScope> training;
  if (host == Host::TorchScriptTrainingScope) training.emplace();
  const bool scripted = host != Host::TorchNn;
  torch::manual_seed(0);
  auto nn = std::make_shared<Plain>();
  auto jit = scripted_twin(*nn);
  const auto x = torch::randn({kBatch, kC, kHW, kHW});
  const auto target = torch::randn({kBatch, kHW * kHW, kC});
  auto forward = [&] { return scripted ? jit.forward({x}).toTensor() : nn->forward(x); };
  if (!torch::allclose(jit.forward({x}).toTensor(), nn->forward(x), 1e-4, 1e-4))
    return state.SkipWithError("the TorchScript twin computes something else than the torch::nn model");
  for (auto& p : nn->parameters()) p.requires_grad_(false);
  for (auto p : jit.parameters()) p.requires_grad_(false);
  if (algo.empty()) {
    const auto xg = x.clone().requires_grad_(true);
    auto fwd = [&] { return scripted ? jit.forward({xg}).toTensor() : nn->forward(xg); };
    for (auto _ : state) {
      torch::mse_loss(fwd(), target).backward();
      xg.mutable_grad().reset();
    }
    return;
  }
  auto opts = lycoris::NetworkOptions().module(algo_options(algo));
  auto net = scripted ? lycoris::create_lycoris(jit, 1.0, 16, 8.0, opts)  //
                      : lycoris::create_lycoris(nn, 1.0, 16, 8.0, opts);
  net->apply_to();
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(1e-4));
  for (auto _ : state) {
    torch::mse_loss(forward(), target).backward();
    opt.step();
    opt.zero_grad();
    net->on_step();
  }
  net->restore();
}

// Two adapter files (LoRA and LoKr, every layer) for a TorchScript model of 100 Linear layers, switched
// back and forth under NoGradGuard as a deployed program would: restore one, apply the other.
struct SwitchSetup {
  std::shared_ptr<Plain> nn = std::make_shared<Plain>(0, 20);
  torch::jit::Module jit = scripted_twin(*nn);
  lycoris::LycorisNetwork a{nullptr}, b{nullptr};
  SwitchSetup() {
    const auto dir = std::filesystem::temp_directory_path() / "lycoris-jit-bench";
    std::filesystem::create_directories(dir);
    const std::string fa = (dir / "a.safetensors").string(), fb = (dir / "b.safetensors").string();
    for (const auto& [file, algo] : {std::pair{fa, std::string("lora")}, std::pair{fb, std::string("lokr")}}) {
      auto net = lycoris::create_lycoris(jit, 1.0, 16, 8.0, lycoris::NetworkOptions().module(algo_options(algo)));
      torch::NoGradGuard g;
      for (auto& p : net->parameters()) p.add_(torch::randn_like(p) * 0.01);
      net->save_weights(file);
    }
    a = lycoris::create_lycoris_from_weights(jit, fa, 0.8);
    b = lycoris::create_lycoris_from_weights(jit, fb, 1.0);
    a->eval();
    b->eval();
  }
};

void switch_files(benchmark::State& state) {
  torch::manual_seed(0);
  SwitchSetup s;
  torch::NoGradGuard no_grad;
  s.a->apply_to();
  bool on_a = true;
  for (auto _ : state) {
    (on_a ? s.a : s.b)->restore();
    (on_a ? s.b : s.a)->apply_to();
    on_a = !on_a;
  }
  state.counters["layers"] = static_cast<double>(s.a->modules().size());
  (on_a ? s.a : s.b)->restore();
}

// The floor a switch is measured against: recomputing the weights of every layer one file touches.
void refresh_one(benchmark::State& state, bool lora) {
  torch::manual_seed(0);
  SwitchSetup s;
  torch::NoGradGuard no_grad;
  auto& net = lora ? s.a : s.b;
  net->apply_to();
  for (auto _ : state) net->refresh();
  net->restore();
}

void register_all() {
  const std::pair<Host, const char*> hosts[] = {{Host::TorchNn, "torch_nn"},
                                                {Host::TorchScript, "torchscript"},
                                                {Host::TorchScriptTrainingScope, "torchscript_training_scope"}};
  for (const std::string algo : {"", "lora", "lokr"})
    for (const auto& [host, label] : hosts) {
      const std::string name = "train_step/" + (algo.empty() ? std::string("no_adapter") : algo) + "/" + label;
      benchmark::RegisterBenchmark(name.c_str(), [algo, host = host](benchmark::State& s) {
        train_step(s, algo, host);
      })->Unit(benchmark::kMillisecond);
    }
  benchmark::RegisterBenchmark("switch_100_layers/restore_lora+apply_lokr_and_back", switch_files)
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("switch_100_layers/refresh_lora", [](benchmark::State& s) { refresh_one(s, true); })
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("switch_100_layers/refresh_lokr", [](benchmark::State& s) { refresh_one(s, false); })
      ->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  // as train_bench: comparable numbers on any machine; LYCORIS_BENCH_THREADS=1 on a machine that is busy
  const char* threads = std::getenv("LYCORIS_BENCH_THREADS");
  torch::set_num_threads(threads ? std::max(1, std::atoi(threads)) : 2);
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
