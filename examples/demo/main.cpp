// demo: adapt a pretrained model to new classes with every LyCORIS algorithm and compare them.
//   demo [--quick] [--algo A,B,…] [--out DIR] [--retrain] [--threads N] [--data DIR] [--steps N] [--nproc N]
// Data-parallel: --nproc N starts N processes of itself; started by torchrun, each process is one rank
// (torchrun --no_python --nproc_per_node 2 build/examples/demo --quick). See docs/demo.md.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "demo.hpp"
#include "lycoris/error.hpp"
#include "lycoris/threads.hpp"

namespace demo = lycoris::demo;

namespace {

struct Settings {
  bool quick = false, retrain = false;
  std::string algos, out = "demo-out", data_dir = demo::default_data_dir();
  // One thread: the models are small (a step is ~50 ms), and torch's spinning OpenMP team turns any other
  // load on the machine into a 10x slowdown (measured: 664 ms per step at 2 threads against 56 ms at 1).
  int threads = 1;
  int64_t steps = 0;
  int nproc = 1;
};

// The whole experiment in this process. Data-parallel (`group`): rank 0 pretrains, evaluates, writes and
// prints; every rank trains its shard.
void run(const Settings& s, const lycoris::distributed::ProcessGroupPtr& group) {
  const auto t0 = std::chrono::steady_clock::now();
  const bool leader = !group || group->rank() == 0;
  lycoris::set_num_threads(s.threads);  // deliberate: the timings in the table depend on it
  const auto specs = demo::select_algos(s.algos);
  std::filesystem::create_directories(s.out);

  demo::ModelConfig model_config;
  demo::PretrainConfig pre;
  pre.steps = s.quick ? 300 : 1000;
  demo::AdaptConfig adapt;
  adapt.steps = s.steps > 0 ? s.steps : (s.quick ? 80 : 250);
  adapt.group = group;
  const int64_t max_test = s.quick ? 1000 : 0;

  if (leader) std::fprintf(stderr, "loading Fashion-MNIST from %s\n", s.data_dir.c_str());
  const auto data = demo::load_data(s.data_dir, 0, max_test);
  if (leader)
    std::fprintf(stderr, "old classes 0-4: %lld train / %lld test images; new classes 5-9: %lld / %lld; %d thread(s) "
                         "(--threads N to change)\n",
                 static_cast<long long>(data.old_train.size()), static_cast<long long>(data.old_test.size()),
                 static_cast<long long>(data.new_train.size()), static_cast<long long>(data.new_test.size()),
                 s.threads);

  const std::string base_path = (std::filesystem::path(s.out) / "base.safetensors").string();
  if (group)  // rank 0 pretrains (or finds the cache); then every rank reads the file
    group->on_rank0(
        [&] { demo::pretrained_base(model_config, pre, data.old_train, base_path, s.retrain, true, !s.quick); },
        "pretraining the base model");
  auto base =
      demo::pretrained_base(model_config, pre, data.old_train, base_path, s.retrain && !group, leader, !s.quick);
  demo::BaseInfo info;
  if (leader) {
    const auto forward = [&](const torch::Tensor& x) { return base->forward(x); };
    info.old_acc = demo::accuracy(demo::predict(forward, data.old_test), data.old_test.labels);
    info.new_acc = demo::accuracy(demo::predict(forward, data.new_test), data.new_test.labels);
    for (const auto& p : base->parameters()) info.parameters += p.numel();
    info.file_bytes = static_cast<int64_t>(std::filesystem::file_size(base_path));
    std::fprintf(stderr, "base model: %lld parameters, test accuracy old classes %.3f, new classes %.3f\n",
                 static_cast<long long>(info.parameters), info.old_acc, info.new_acc);
  }

  std::vector<demo::AlgoResult> rows;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (leader)
      std::fprintf(stderr, "[%zu/%zu] %s (%s)\n", i + 1, specs.size(), specs[i].label.c_str(),
                   specs[i].settings.c_str());
    rows.push_back(demo::adapt(specs[i], model_config, base_path, data, adapt, s.out));
    if (!leader) continue;
    const auto& r = rows.back();
    std::fprintf(stderr, "    new %.3f  old(merged) %.3f  among-old %.3f  max diff %.1e  %.1f ms/step  %lld values\n",
                 r.new_acc, r.old_acc, r.old_acc_within, r.max_diff, r.ms_per_step,
                 static_cast<long long>(r.trainable));
    demo::write_report(s.out, info, rows);  // partial results survive an interrupted run
  }
  if (!leader) return;
  const auto png = demo::write_report(s.out, info, rows);
  std::printf("\n%s", demo::markdown_table(info, rows).c_str());
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string procs = group ? std::to_string(group->world_size()) + " processes x " : "";
  std::printf("\n%zu algorithms, %lld adapter steps each, batch %lld, %s%d threads, %.0f s. Written to %s/: "
              "results.md, results.csv%s, base/adapter-*/merged-*.safetensors\n",
              rows.size(), static_cast<long long>(adapt.steps), static_cast<long long>(adapt.batch), procs.c_str(),
              s.threads, secs, s.out.c_str(), png.empty() ? "" : ", accuracy_vs_size.png");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LyCORIS demo: Fashion-MNIST, base model pretrained on classes 0-4, every algorithm adapts it "
               "to classes 5-9 (only the adapter is trained); prints and writes the comparison table."};
  Settings s;
  app.add_flag("--quick", s.quick, "Smaller run (about one minute): fewer steps and test images");
  app.add_option("--algo", s.algos, "Comma list of rows: lora, loha, lokr-small, lokr-large (or lokr for both), full, "
                                    "ia3, dylora, glora, glokr, diag-oft, boft (default: all)");
  app.add_option("--out", s.out, "Output directory (base, adapters, merged models, results)")->capture_default_str();
  app.add_flag("--retrain", s.retrain, "Pretrain the base model again even if <out>/base.safetensors exists");
  app.add_option("--threads", s.threads, "torch intra-op threads")->capture_default_str()->check(CLI::Range(1, 256));
  app.add_option("--data", s.data_dir, "Fashion-MNIST directory (gzip IDX files)")->capture_default_str();
  app.add_option("--steps", s.steps, "Adapter training steps per algorithm (default 250, --quick 80)");
  app.add_option("--nproc", s.nproc, "Data-parallel: N local processes, each training on its shard of every batch")
      ->check(CLI::Range(1, 64));
  CLI11_PARSE(app, argc, argv);

  namespace dist = lycoris::distributed;
  try {
    if (s.nproc > 1 && !dist::launched_from_env())
      return dist::launch_local(s.nproc, std::vector<std::string>(argv, argv + argc));
    run(s, dist::launched_from_env() ? dist::init_from_env() : nullptr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "demo: %s\n", e.what());
    return 1;
  }
  return 0;
}
