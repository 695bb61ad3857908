// Adapters on a model exported from PyTorch (docs/training.md#torchscript): load a TorchScript .pt, train
// two adapters on it, then use them as a deployed C++ program would: apply a file at 0.8, run, switch to the
// other file, restore, and merge one into a new .pt. Exits non-zero when a check fails.
//   ./build/examples/torchscript [model.pt [out_dir]]
// The default model is tests/data/torchscript/net_scripted.pt (input [B, 3, 8, 8], output [B, 10]), made by
//   torch.jit.script(Net()).save("net_scripted.pt")          # or torch.jit.trace(net, example_input)
#include <torch/script.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>

#include "lycoris/jit.hpp"
#include "lycoris/lycoris.hpp"

namespace {

int failures = 0;
void check(bool ok, const char* what) {
  std::printf("  %-58s %s\n", what, ok ? "ok" : "FAILED");
  failures += ok ? 0 : 1;
}

torch::Tensor run(torch::jit::Module& model, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return model.forward({x}).toTensor();
}

// A few AdamW steps of a new adapter that pulls the model's outputs towards `target`; saved to `file`.
void train(torch::jit::Module& model, const torch::Tensor& x, const torch::Tensor& target,
           lycoris::AdapterOptions algo, const std::string& file) {
  // Training steps run op by op: a step costs what it costs on the same torch::nn model
  // (docs/training.md#torchscript-speed).
  lycoris::torchscript::TrainingScope training;
  auto net = lycoris::create_lycoris(model, 1.0, 4, 4.0, lycoris::NetworkOptions().module(algo));
  net->apply_to();  // the scripted forward reads W0 + ΔW from the layers' weight slots
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(1e-2));
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    auto loss = torch::mse_loss(model.forward({x}).toTensor(), target);
    loss.backward();
    opt.step();
    opt.zero_grad();
    net->on_step();  // once per optimizer step: recompute W'
    (step == 0 ? first : last) = loss.item<double>();
  }
  std::printf("  %s: %zu layers, loss %.4f -> %.4f\n", algo.algo().c_str(), net->modules().size(), first, last);
  net->save_weights(file);
  net->restore();
}

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path source = std::filesystem::path(__FILE__).parent_path().parent_path();
  const auto fixture = source / "tests/data/torchscript/net_scripted.pt";
  const std::string model_path = argc > 1 && *argv[1] ? argv[1] : fixture.string();
  const std::string out =
      argc > 2 ? argv[2] : (std::filesystem::temp_directory_path() / "lycoris-torchscript").string();
  std::filesystem::create_directories(out);
  try {
    auto model = lycoris::torchscript::load(model_path);
    model.eval();
    torch::manual_seed(0);
    const auto x = torch::randn({4, 3, 8, 8});
    const auto y0 = run(model, x);

    std::printf("training two adapters on %s\n", model_path.c_str());
    const std::string a = out + "/style_a.safetensors", b = out + "/style_b.safetensors";
    train(model, x, y0 + 0.5, lycoris::LoKrOptions().algo("lokr").factor(4), a);
    train(model, x, y0.flip(1), lycoris::LoRAOptions().algo("lora"), b);
    check(torch::equal(run(model, x), y0), "the model is bit-identical after training");

    std::printf("deployment: apply, switch, restore\n");
    auto style_a = lycoris::create_lycoris_from_weights(model, a, 0.8);
    style_a->apply_to();
    const auto ya = run(model, x);
    check((ya - y0).abs().max().item<double>() > 1e-3, "style_a at 0.8 changes the outputs");
    auto style_b = lycoris::create_lycoris_from_weights(model, b, 1.0);
    style_a->restore();  // a switch costs one recomputation of the touched layers (bench/jit_bench)
    style_b->apply_to();
    const auto yb = run(model, x);
    check((yb - ya).abs().max().item<double>() > 1e-3, "style_b gives other outputs");
    style_b->restore();
    check(torch::equal(run(model, x), y0), "restore() gives the original outputs back");

    std::printf("merging style_a at 0.8 into a new archive\n");
    const std::string merged_path = out + "/merged.pt";
    lycoris::torchscript::merge_archive(model_path, merged_path, {{a, 0.8}});
    auto merged = torch::jit::load(merged_path);
    merged.eval();
    check(torch::allclose(run(merged, x), ya, 1e-5, 1e-5), "merged.pt computes what the applied adapter did");
    std::printf("files in %s\n", out.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "torchscript: %s\n", e.what());
    return 1;
  }
  return failures ? 1 : 0;
}
