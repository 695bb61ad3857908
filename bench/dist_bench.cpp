// Data-parallel training speed on the train_bench model (bench/bench_model.hpp, LoRA rank 16, AdamW) at one
// global batch, in both training modes: rebuild (unmodified torch::nn layers, W' = W + ΔW each step) and
// bypass (drop-in lycoris::nn layers, y = W·x + ΔW·x). Per mode: 1 process × 1 thread, 1 process × 2
// threads, and 2 processes × 1 thread (lycoris::distributed::DataParallel over Gloo on loopback, each
// process pinned to its own core). The configurations run interleaved for --rounds rounds and each row is
// the median round. Reports step time, steps/s, speed-up over 1 × 1, the gradient bytes all-reduced per
// step against a full-model DDP of the same model, and the all-reduce time not hidden behind backward.
// Spawns its own processes (itself, with torchrun's environment variables), each setting its threads with
// lycoris::set_num_threads (docs/training.md#threads). The load average is printed with the numbers.
//   ./build/bench/dist_bench [--algo lora] [--batch 8] [--steps 30] [--warmup 5] [--bucket-kb KB]
//                            [--rounds 3] [--mode both|rebuild|bypass]
#include <sched.h>
#include <unistd.h>

#include <torch/torch.h>

#include <chrono>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "bench_model.hpp"
#include "lycoris/distributed.hpp"
#include "lycoris/network.hpp"
#include "lycoris/nn/layers.hpp"
#include "lycoris/text.hpp"
#include "lycoris/threads.hpp"

namespace {

namespace dist = lycoris::distributed;
using Plain = lycoris::bench::BenchModelImpl<torch::nn::Linear, torch::nn::Conv2d>;
using DropIn = lycoris::bench::BenchModelImpl<lycoris::nn::Linear, lycoris::nn::Conv2d>;
using lycoris::bench::kC;
using lycoris::bench::kHW;

struct Config {
  std::string algo = "lora", mode = "both";
  int64_t batch = 8, steps = 30, warmup = 5, bucket_kb = 0, rounds = 3;  // bucket 0: DataParallelOptions' default
};

struct Measure {
  double step_ms = 0, exposed_ms = 0;
  int64_t bytes_per_step = 0, full_bytes = 0;
};

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--algo")
      c.algo = v;
    else if (k == "--batch")
      c.batch = std::stoll(v);
    else if (k == "--steps")
      c.steps = std::stoll(v);
    else if (k == "--warmup")
      c.warmup = std::stoll(v);
    else if (k == "--bucket-kb")
      c.bucket_kb = std::stoll(v);
    else if (k == "--rounds")
      c.rounds = std::max(1LL, std::stoll(v));
    else if (k == "--mode" && (v == "both" || v == "rebuild" || v == "bypass"))
      c.mode = v;
    else
      throw std::runtime_error("unknown option " + k);
  }
  return c;
}

// One process's share: its shard of every global batch; DataParallel when the environment has a group.
template <typename Model>
Measure train(const Config& c, bool bypass) {
  torch::manual_seed(0);
  auto model = std::make_shared<Model>();
  int64_t full = 0;
  for (const auto& p : model->parameters()) full += p.numel() * static_cast<int64_t>(p.element_size());
  dist::ProcessGroupPtr group = dist::init_from_env();
  if (group->world_size() == 1) group.reset();  // the one-process rows: plain training
  const int64_t world = group ? group->world_size() : 1, rank = group ? group->rank() : 0;
  if (c.batch % world) throw std::runtime_error("--batch must be a multiple of the process count");
  const int64_t shard = c.batch / world;
  const auto x = torch::randn({c.batch, kC, kHW, kHW}).narrow(0, rank * shard, shard);
  const auto target = torch::randn({c.batch, kHW * kHW, kC}).narrow(0, rank * shard, shard);
  auto module = lycoris::AdapterOptions().algo(c.algo).bypass_mode(bypass);
  if (c.algo == "lokr") module.factor(8);
  auto net = lycoris::create_lycoris(model, 1.0, 16, 8.0, lycoris::NetworkOptions().module(module));
  net->freeze_model();
  net->apply_to();
  std::unique_ptr<dist::DataParallel> ddp;
  auto ddp_options = dist::DataParallelOptions();
  if (c.bucket_kb > 0) ddp_options.bucket_bytes(c.bucket_kb * 1024);
  if (group) ddp = std::make_unique<dist::DataParallel>(net, group, ddp_options);
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(1e-4));
  auto step = [&] {
    torch::mse_loss(model->forward(x), target).backward();
    ddp ? ddp->step(opt) : net->step(opt);
  };
  for (int64_t i = 0; i < c.warmup; ++i) step();
  if (group) group->barrier("start of the timed steps");
  if (ddp) ddp->reset_stats();
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < c.steps; ++i) step();
  if (group) group->barrier("end of the timed steps");
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  Measure m;
  m.step_ms = ms / static_cast<double>(c.steps);
  m.full_bytes = full;
  if (ddp) {
    m.exposed_ms = ddp->stats().exposed_seconds * 1000 / static_cast<double>(c.steps);
    m.bytes_per_step = ddp->stats().bytes / c.steps;
  }
  return m;
}

// Runs `procs` copies of this program with `threads` threads each (launch_local); rank 0's measure (the
// barriers make the ranks' times equal), read back from a file.
Measure spawn(char** argv, int argc, const std::string& mode, int procs, int threads, bool pin) {
  const std::string result = "/tmp/lycoris_dist_bench_" + std::to_string(getpid()) + ".txt";
  std::remove(result.c_str());
  const int code = dist::launch_local(
      procs, std::vector<std::string>(argv, argv + argc),
      {"LYCORIS_BENCH_THREADS=" + std::to_string(threads), "OMP_NUM_THREADS=" + std::to_string(threads),
       "LYCORIS_BENCH_MODE=" + mode, "LYCORIS_BENCH_RESULT=" + result,
       std::string("LYCORIS_BENCH_PIN=") + (pin ? "1" : "0")});
  std::ifstream in(result);
  Measure m;
  std::string tag;
  if (code != 0 || !(in >> tag >> m.step_ms >> m.exposed_ms >> m.bytes_per_step >> m.full_bytes))
    throw std::runtime_error("a bench process failed (exit status " + std::to_string(code) + ")");
  std::remove(result.c_str());
  return m;
}

// The round with the median step time.
Measure median(std::vector<Measure> rounds) {
  std::sort(rounds.begin(), rounds.end(), [](const Measure& a, const Measure& b) { return a.step_ms < b.step_ms; });
  return rounds[rounds.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Config c = parse(argc, argv);
    if (const char* threads = std::getenv("LYCORIS_BENCH_THREADS")) {  // a child
      lycoris::set_num_threads(std::atoi(threads));
      if (std::string(std::getenv("LYCORIS_BENCH_PIN")) == "1") {  // rank r on core r
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(std::atoi(std::getenv("LOCAL_RANK")) % std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)), &set);
        sched_setaffinity(0, sizeof set, &set);
      }
      const bool bypass = std::string(std::getenv("LYCORIS_BENCH_MODE")) == "bypass";
      const Measure m = bypass ? train<DropIn>(c, true) : train<Plain>(c, false);
      if (std::atoi(std::getenv("RANK")) == 0)
        std::ofstream(std::getenv("LYCORIS_BENCH_RESULT"))
            << "RESULT " << m.step_ms << " " << m.exposed_ms << " " << m.bytes_per_step << " " << m.full_bytes << "\n";
      return 0;
    }
    double load[3] = {0, 0, 0};
    getloadavg(load, 3);
    std::printf(
        "%s rank 16, train_bench model, global batch %lld, %lld timed steps (after %lld), buckets of %lld KiB, "
        "median of %lld interleaved rounds; load average before: %.2f %.2f %.2f\n",
        c.algo.c_str(), static_cast<long long>(c.batch), static_cast<long long>(c.steps),
        static_cast<long long>(c.warmup),
        static_cast<long long>(c.bucket_kb > 0 ? c.bucket_kb : dist::DataParallelOptions().bucket_bytes() / 1024),
        static_cast<long long>(c.rounds),
        load[0], load[1], load[2]);
    std::vector<std::string> modes;
    if (c.mode != "bypass") modes.push_back("rebuild");
    if (c.mode != "rebuild") modes.push_back("bypass");
    for (const auto& mode : modes) {
      std::vector<Measure> ones, twos_threads, twos_procs;
      for (int64_t r = 0; r < c.rounds; ++r) {
        ones.push_back(spawn(argv, argc, mode, 1, 1, true));
        twos_threads.push_back(spawn(argv, argc, mode, 1, 2, false));
        twos_procs.push_back(spawn(argv, argc, mode, 2, 1, true));
      }
      const Measure one = median(ones), two_threads = median(twos_threads), two_procs = median(twos_procs);
      std::printf("\n%s mode\n%-22s %10s %8s %9s %14s %16s\n", mode.c_str(), "processes x threads", "step ms",
                  "steps/s", "vs 1x1", "all-reduce/step", "unhidden comm");
      auto row = [&](const char* name, const Measure& m) {
        std::printf("%-22s %10.1f %8.2f %8.2fx %12.2f MB %9.2f ms %4.1f%%\n", name, m.step_ms, 1000 / m.step_ms,
                    one.step_ms / m.step_ms, static_cast<double>(m.bytes_per_step) / 1e6, m.exposed_ms,
                    100 * m.exposed_ms / m.step_ms);
      };
      row("1 x 1", one);
      row("1 x 2", two_threads);
      row("2 x 1", two_procs);
      std::printf(
          "2 x 1 step time / 1 x 1: %.2f (goal <= 0.60); unhidden all-reduce: %.1f%% of the step (goal <= 10%%)\n",
          two_procs.step_ms / one.step_ms, 100 * two_procs.exposed_ms / two_procs.step_ms);
      // each round's two runs are close in time: their ratio cancels the machine's drift between rounds
      std::vector<double> ratios;
      for (size_t r = 0; r < ones.size(); ++r) ratios.push_back(twos_procs[r].step_ms / ones[r].step_ms);
      std::printf("per round, 2 x 1 / 1 x 1:");
      for (double q : ratios) std::printf(" %.2f", q);
      std::sort(ratios.begin(), ratios.end());
      std::printf(" (median %.2f)", ratios[ratios.size() / 2]);
      std::printf("\nall-reduced per step: %.2f MB of adapter gradients; "
                  "a full-model DDP of this model: %.2f MB (%.1fx)\n",
                  static_cast<double>(two_procs.bytes_per_step) / 1e6, static_cast<double>(two_procs.full_bytes) / 1e6,
                  static_cast<double>(two_procs.full_bytes) /
                      static_cast<double>(std::max<int64_t>(1, two_procs.bytes_per_step)));
    }
    getloadavg(load, 3);
    std::printf("load average after: %.2f %.2f %.2f\n", load[0], load[1], load[2]);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "dist_bench: " << e.what() << "\n";
    return 1;
  }
}
