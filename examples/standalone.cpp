// The C++ twin of the reference's standalone example: build a small model, wrap it with LoKr through a
// preset, train a few steps, save, reload with create_lycoris_from_weights, merge. Exits non-zero when a
// check fails.
//   ./build/examples/standalone [out_dir]
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <iostream>

#include "lycoris/lycoris.hpp"

namespace {

// User modules with their own class names ("Attention", "FeedForward"): preset targets match these.
struct AttentionImpl : torch::nn::Module {
  torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, to_out{nullptr};
  explicit AttentionImpl(int64_t d) {
    to_q = register_module("to_q", torch::nn::Linear(d, d));
    to_k = register_module("to_k", torch::nn::Linear(d, d));
    to_v = register_module("to_v", torch::nn::Linear(d, d));
    to_out = register_module("to_out", torch::nn::Linear(d, d));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto a = torch::softmax(to_q(x).matmul(to_k(x).transpose(1, 2)) / std::sqrt(double(x.size(-1))), -1);
    return to_out(a.matmul(to_v(x)));
  }
};
TORCH_MODULE(Attention);

struct FeedForwardImpl : torch::nn::Module {
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  explicit FeedForwardImpl(int64_t d) {
    fc1 = register_module("fc1", torch::nn::Linear(d, 4 * d));
    fc2 = register_module("fc2", torch::nn::Linear(4 * d, d));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::gelu(fc1(x))); }
};
TORCH_MODULE(FeedForward);

struct ModelImpl : torch::nn::Module {
  torch::nn::Conv2d stem{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  Attention attn{nullptr};
  FeedForward ff{nullptr};
  torch::nn::Linear head{nullptr};
  ModelImpl() {
    stem = register_module("stem", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 32, 3).stride(2).padding(1)));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({32})));
    attn = register_module("attn", Attention(32));
    ff = register_module("ff", FeedForward(32));
    head = register_module("head", torch::nn::Linear(32, 10));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto t = stem(x).flatten(2).transpose(1, 2);  // [B, L, 32]
    t = t + attn(norm(t));
    t = t + ff(norm(t));
    return head(t.mean(1));
  }
};
TORCH_MODULE(Model);

int failures = 0;
void check(bool ok, const std::string& what) {
  std::cout << (ok ? "  ok    " : "  FAIL  ") << what << "\n";
  if (!ok) ++failures;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : (std::filesystem::temp_directory_path() / "lycoris_standalone").string();
  std::filesystem::create_directories(dir);
  torch::manual_seed(0);
  torch::set_num_threads(2);

  Model model;
  Model teacher;  // the task: match a perturbed copy of the model
  {
    torch::NoGradGuard g;
    auto src = model->named_parameters();
    for (auto& p : teacher->named_parameters()) p.value().copy_(src[p.key()] + 0.05 * torch::randn_like(p.value()));
  }
  const auto x = torch::randn({16, 3, 16, 16});
  const auto target = teacher->forward(x).detach();
  const auto y_base = model->forward(x).detach();

  // The preset: LoKr (factor 4) on the attention and feed-forward blocks, matched by their C++ class names;
  // LoRA rank 2 on the classifier head by name; the stem and the norm are left alone.
  lycoris::Preset preset;
  preset.name = "standalone";
  preset.target_module = {};  // module_algo_map classes are targets by themselves
  preset.module_algo_map = {{"Attention", lycoris::ModuleOverride{{"factor", int64_t{4}}}},
                            {"FeedForward", lycoris::ModuleOverride{{"factor", int64_t{8}}}}};
  preset.name_algo_map = {{"head", lycoris::ModuleOverride{{"algo", std::string("lora")}, {"dim", int64_t{2}}}}};
  auto net = lycoris::create_lycoris(model, 1.0, 8, 4.0,
                                     lycoris::NetworkOptions().preset(preset).module(lycoris::LoKrOptions().algo("lokr")));
  std::cout << "created " << net->modules().size() << " adapter modules:\n";
  for (const auto& m : net->modules())
    std::cout << "  " << m.name << "  " << m.algo << "  on " << m.path << " " << m.layer.describe() << "\n";
  int64_t n_params = 0;
  for (const auto& p : net->parameters()) n_params += p.numel();
  std::cout << "trainable parameters: " << n_params << "\n";

  net->apply_to();
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(5e-3));
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    auto loss = torch::mse_loss(model->forward(x), target);
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
    if (step % 10 == 0) std::printf("step %2d  loss %.6f\n", step, last);
    loss.backward();
    opt.step();
    opt.zero_grad();
    net->on_step();  // once per step: recompute the adapted weights
  }
  std::printf("final   loss %.6f\n", last);
  check(last < 0.7 * first, "training lowered the loss");

  torch::NoGradGuard no_grad;
  net->eval();
  net->refresh();
  const auto y_trained = model->forward(x);
  const std::string file = dir + "/standalone_lokr.safetensors";
  net->save_weights(file, torch::kFloat, {{"example", "standalone"}});
  std::cout << "saved " << file << "\n";

  net->restore();
  check(torch::equal(model->forward(x), y_base), "restore() gives the original outputs back bit for bit");

  auto loaded = lycoris::create_lycoris_from_weights(model, file);
  check(loaded->modules().size() == net->modules().size() && loaded->warnings().empty(),
        "create_lycoris_from_weights bound every module");
  loaded->apply_to();
  check(torch::allclose(model->forward(x), y_trained, 1e-5, 1e-5), "the reloaded network reproduces the outputs");
  loaded->restore();

  loaded->merge_to(1.0);
  check(torch::allclose(model->forward(x), y_trained, 1e-4, 1e-4), "merge_to(1) folds the adapter into the model");
  std::cout << (failures ? "FAILED" : "all checks passed") << "\n";
  return failures ? 1 : 0;
}
