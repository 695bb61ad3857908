// GLoKr vs GLoRA vs LoKr on a small Fashion-MNIST task (docs/glokr.md "Measured comparison").
// 1. Pretrain a frozen MLP 784→128→64→10 on classes 0–7.
// 2. For each adapter config: wrap all three Linear layers, train only the adapter on classes 8–9 plus a
//    small replay of classes 0–7 (same data, seed and steps for every config), rebuild mode.
// 3. Report parameters, saved file size, ms/step, new-class test accuracy (classes 8–9, 10-way) and
//    forgetting (old-class test accuracy before − after).
// Rebuild mode (W' formed each step) unless the config says bypass.
// Usage: glokr_compare [fashion-mnist dir] [steps] [seed]
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"
#include "idx.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/layer.hpp"

using namespace lycoris;

namespace {

struct Mlp {
  std::vector<LayerSpec> specs{LayerSpec::linear(784, 128), LayerSpec::linear(128, 64), LayerSpec::linear(64, 10)};
  std::vector<torch::Tensor> W, b;
  Mlp() {
    for (auto& s : specs) {
      torch::nn::Linear l(s.in_features, s.out_features);
      W.push_back(l->weight.detach().clone().requires_grad_(true));
      b.push_back(l->bias.detach().clone().requires_grad_(true));
    }
  }
  // adapters empty → the base model
  torch::Tensor forward(torch::Tensor x, const std::vector<AdapterPtr>& ad = {}, bool bypass = false) const {
    x = x.reshape({x.size(0), -1});
    for (size_t i = 0; i < specs.size(); ++i) {
      if (bypass && !ad.empty())
        x = ad[i]->bypass_forward(x, W[i], b[i], 1.0);
      else
        x = layer_forward(x, specs[i], ad.empty() ? W[i] : ad[i]->apply_weight(W[i], 1.0), b[i]);
      if (i + 1 < specs.size()) x = torch::relu(x);
    }
    return x;
  }
};

double accuracy(const Mlp& m, const std::vector<AdapterPtr>& ad, const torch::Tensor& x, const torch::Tensor& y) {
  if (x.size(0) == 0) return 0;
  torch::NoGradGuard g;
  return m.forward(x, ad).argmax(1).eq(y).to(torch::kFloat64).mean().item<double>();
}

torch::Tensor select(const torch::Tensor& labels, bool new_class) {
  auto mask = new_class ? labels.ge(8) : labels.lt(8);
  return mask.nonzero().squeeze(1);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/usr/share/datasets/fashion-mnist";
  const int steps = argc > 2 ? std::stoi(argv[2]) : 400;
  const int seed = argc > 3 ? std::stoi(argv[3]) : 1;  // adapter init + batch order (the base model is fixed)
  torch::manual_seed(0);
  torch::set_num_threads(1);
  auto train = data::read_idx_dataset(dir, "train");
  auto test = data::read_idx_dataset(dir, "t10k");
  auto old_tr = select(train.labels, false), new_tr = select(train.labels, true);
  auto old_te = select(test.labels, false), new_te = select(test.labels, true);
  auto xo = test.images.index_select(0, old_te), yo = test.labels.index_select(0, old_te);
  auto xn = test.images.index_select(0, new_te), yn = test.labels.index_select(0, new_te);

  // 1. pretrain on the old classes
  Mlp m;
  {
    std::vector<torch::Tensor> params(m.W);
    params.insert(params.end(), m.b.begin(), m.b.end());
    torch::optim::Adam opt(params, torch::optim::AdamOptions(1e-3));
    for (int step = 0; step < 1500; ++step) {
      auto idx = old_tr.index_select(0, torch::randint(old_tr.size(0), {128}, torch::kLong));
      auto loss = torch::cross_entropy_loss(m.forward(train.images.index_select(0, idx)), train.labels.index_select(0, idx));
      opt.zero_grad();
      loss.backward();
      opt.step();
    }
    for (auto& t : m.W) t.requires_grad_(false);
    for (auto& t : m.b) t.requires_grad_(false);
  }
  const double base_old = accuracy(m, {}, xo, yo), base_new = accuracy(m, {}, xn, yn);
  std::printf("base (classes 0-7 only): old-class acc %.4f, new-class acc %.4f\n\n", base_old, base_new);
  std::printf("| config | params | file bytes | ms/step | new-class acc | old-class acc | forgetting |\n");
  std::printf("|---|---|---|---|---|---|---|\n");

  struct Config {
    std::string name;
    AdapterOptions options;
    bool bypass = false;
  };
  std::vector<Config> configs = {
      {"glora r=4", AdapterOptions().algo("glora").rank(4).alpha(4)},
      {"glora r=1", AdapterOptions().algo("glora").rank(1).alpha(1)},
      {"lokr r=4", AdapterOptions().algo("lokr").rank(4).alpha(4)},
      {"lokr r=16 factor=8", AdapterOptions().algo("lokr").rank(16).alpha(16).factor(8)},
      {"lokr full_matrix", AdapterOptions().algo("lokr").rank(4).full_matrix(true)},
      {"glokr r=4", AdapterOptions().algo("glokr").rank(4).alpha(4)},
      {"glokr r=16 factor=8", AdapterOptions().algo("glokr").rank(16).alpha(16).factor(8)},
      {"glokr full_matrix", AdapterOptions().algo("glokr").rank(4).full_matrix(true)},
      {"glora r=4 bypass", AdapterOptions().algo("glora").rank(4).alpha(4), true},
      {"lokr r=4 bypass", AdapterOptions().algo("lokr").rank(4).alpha(4), true},
      {"glokr r=4 bypass", AdapterOptions().algo("glokr").rank(4).alpha(4), true},
  };
  const auto tmp = std::filesystem::temp_directory_path() / "glokr_compare";
  std::filesystem::create_directories(tmp);
  for (auto& c : configs) {
    torch::manual_seed(seed);
    std::vector<AdapterPtr> ad;
    std::vector<torch::Tensor> params;
    int64_t n_params = 0;
    for (auto& s : m.specs) {
      ad.push_back(find_algorithm(c.options.algo()).create(s, c.options));
      ad.back()->train();
      for (auto& p : ad.back()->parameters()) {
        params.push_back(p);
        n_params += p.numel();
      }
    }
    torch::optim::Adam opt(params, torch::optim::AdamOptions(2e-3));
    double ms = 0;
    for (int step = 0; step < steps; ++step) {
      // 96 new-class samples + 32 replayed old-class samples per batch
      auto idx = torch::cat({new_tr.index_select(0, torch::randint(new_tr.size(0), {96}, torch::kLong)),
                             old_tr.index_select(0, torch::randint(old_tr.size(0), {32}, torch::kLong))});
      auto x = train.images.index_select(0, idx), y = train.labels.index_select(0, idx);
      auto t0 = std::chrono::steady_clock::now();
      auto loss = torch::cross_entropy_loss(m.forward(x, ad, c.bypass), y);
      opt.zero_grad();
      loss.backward();
      opt.step();
      ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    }
    for (auto& a : ad) a->eval();
    NamedTensors file;
    const char* names[] = {"lora_unet_fc1", "lora_unet_fc2", "lora_unet_fc3"};
    for (size_t i = 0; i < ad.size(); ++i)
      for (auto& [k, v] : ad[i]->file_tensors()) file.emplace_back(std::string(names[i]) + "." + k, v.contiguous());
    auto path = (tmp / (c.options.algo() + ".safetensors")).string();
    io::save_file(path, file);
    const double old_acc = accuracy(m, ad, xo, yo), new_acc = accuracy(m, ad, xn, yn);
    std::printf("| %s | %lld | %lld | %.2f | %.4f | %.4f | %.4f |\n", c.name.c_str(), static_cast<long long>(n_params),
                static_cast<long long>(std::filesystem::file_size(path)), ms / steps, new_acc, old_acc,
                base_old - old_acc);
    std::fflush(stdout);
  }
  return 0;
}
