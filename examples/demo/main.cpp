// demo: adapt a pretrained model to new classes with every LyCORIS algorithm and compare them.
//   demo [--quick] [--algo A,B,…] [--out DIR] [--retrain] [--threads N] [--data DIR] [--steps N]
// See docs/demo.md.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "demo.hpp"
#include "lycoris/error.hpp"

namespace demo = lycoris::demo;

int main(int argc, char** argv) {
  CLI::App app{"LyCORIS demo: Fashion-MNIST, base model pretrained on classes 0-4, every algorithm adapts it "
               "to classes 5-9 (only the adapter is trained); prints and writes the comparison table."};
  bool quick = false, retrain = false;
  std::string algos, out = "demo-out", data_dir = demo::default_data_dir();
  // One thread: the models are small (a step is ~50 ms), and torch's spinning OpenMP team turns any other
  // load on the machine into a 10x slowdown (measured: 664 ms per step at 2 threads against 56 ms at 1).
  int threads = 1;
  int64_t steps = 0;
  app.add_flag("--quick", quick, "Smaller run (about one minute): fewer steps and test images");
  app.add_option("--algo", algos, "Comma list of rows: lora, loha, lokr-small, lokr-large (or lokr for both), full, ia3, "
                                  "dylora, glora, glokr, diag-oft, boft (default: all)");
  app.add_option("--out", out, "Output directory (base, adapters, merged models, results)")->capture_default_str();
  app.add_flag("--retrain", retrain, "Pretrain the base model again even if <out>/base.safetensors exists");
  app.add_option("--threads", threads, "torch intra-op threads")->capture_default_str()->check(CLI::Range(1, 256));
  app.add_option("--data", data_dir, "Fashion-MNIST directory (gzip IDX files)")->capture_default_str();
  app.add_option("--steps", steps, "Adapter training steps per algorithm (default 250, --quick 80)");
  CLI11_PARSE(app, argc, argv);

  try {
    const auto t0 = std::chrono::steady_clock::now();
    torch::set_num_threads(threads);  // deliberate: the timings in the table depend on it
    const auto specs = demo::select_algos(algos);
    std::filesystem::create_directories(out);

    demo::ModelConfig model_config;
    demo::PretrainConfig pre;
    pre.steps = quick ? 300 : 1000;
    demo::AdaptConfig adapt;
    adapt.steps = steps > 0 ? steps : (quick ? 80 : 250);
    const int64_t max_test = quick ? 1000 : 0;

    std::fprintf(stderr, "loading Fashion-MNIST from %s\n", data_dir.c_str());
    const auto data = demo::load_data(data_dir, 0, max_test);
    std::fprintf(stderr, "old classes 0-4: %lld train / %lld test images; new classes 5-9: %lld / %lld; %d thread(s) "
                         "(--threads N to change)\n",
                 static_cast<long long>(data.old_train.size()), static_cast<long long>(data.old_test.size()),
                 static_cast<long long>(data.new_train.size()), static_cast<long long>(data.new_test.size()), threads);

    const std::string base_path = (std::filesystem::path(out) / "base.safetensors").string();
    auto base = demo::pretrained_base(model_config, pre, data.old_train, base_path, retrain, true, !quick);
    demo::BaseInfo info;
    info.old_acc = demo::accuracy(demo::predict([&](const torch::Tensor& x) { return base->forward(x); }, data.old_test),
                                  data.old_test.labels);
    info.new_acc = demo::accuracy(demo::predict([&](const torch::Tensor& x) { return base->forward(x); }, data.new_test),
                                  data.new_test.labels);
    for (const auto& p : base->parameters()) info.parameters += p.numel();
    info.file_bytes = static_cast<int64_t>(std::filesystem::file_size(base_path));
    std::fprintf(stderr, "base model: %lld parameters, test accuracy old classes %.3f, new classes %.3f\n",
                 static_cast<long long>(info.parameters), info.old_acc, info.new_acc);

    std::vector<demo::AlgoResult> rows;
    for (size_t i = 0; i < specs.size(); ++i) {
      std::fprintf(stderr, "[%zu/%zu] %s (%s)\n", i + 1, specs.size(), specs[i].label.c_str(), specs[i].settings.c_str());
      rows.push_back(demo::adapt(specs[i], model_config, base_path, data, adapt, out));
      const auto& r = rows.back();
      std::fprintf(stderr, "    new %.3f  old(merged) %.3f  among-old %.3f  max diff %.1e  %.1f ms/step  %lld values\n",
                   r.new_acc, r.old_acc, r.old_acc_within, r.max_diff, r.ms_per_step,
                   static_cast<long long>(r.trainable));
      demo::write_report(out, info, rows);  // partial results survive an interrupted run
    }
    const auto png = demo::write_report(out, info, rows);
    std::printf("\n%s", demo::markdown_table(info, rows).c_str());
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("\n%zu algorithms, %lld adapter steps each, batch %lld, %d threads, %.0f s. Written to %s/: "
                "results.md, results.csv%s, base/adapter-*/merged-*.safetensors\n",
                rows.size(), static_cast<long long>(adapt.steps), static_cast<long long>(adapt.batch), threads, secs,
                out.c_str(), png.empty() ? "" : ", accuracy_vs_size.png");
  } catch (const lycoris::Error& e) {
    std::fprintf(stderr, "demo: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "demo: %s\n", e.what());
    return 1;
  }
  return 0;
}
