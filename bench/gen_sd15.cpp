// gen_sd15: an SD1.5-shaped UNet checkpoint and rank-16 adapters for it, for the merge benchmark.
//
//   gen_sd15 [--layers bench/data/sd15_unet_layers.json] [--out bench/data/out] [--seed 1234]
//            [--algos locon,loha,lokr,locon_dora,loha_dora,ia3] [--no-base]
//
// Writes (with our own SafetensorsWriter / save_file):
//   <out>/sd15_unet.safetensors        every layer of the JSON list (391: diffusers names "<module>.weight",
//                                      "<module>.bias"), fp16, N(0, 0.02²) values (≈1.72 GB)
//   <out>/untouched.safetensors        an adapter matching no layer (merged with --allow-unmatched = our
//                                      reader → writer copy floor)
//   <out>/<algo>_r16.safetensors        one module per Linear/Conv2d layer (282), kohya names
//                                      "lora_unet_<module with . → _>", rank 16, alpha 8, fp16 tensors;
//                                      factors N(0, σ²) with σ chosen so that ΔW is of the size of W·1e-2
// The adapters are built through the registry (Algorithm::create then file_tensors()), so every file
// is exactly what our trainer would save; values come from one torch::manual_seed(seed): same seed,
// same bytes. Cost: ≈ 10–20 s and 1.9 GB of disk.
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "lycoris/algorithms.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/layer.hpp"
#include "lycoris/naming.hpp"

namespace {

using namespace lycoris;

struct Layer {
  std::string module, kind;
  std::vector<int64_t> weight, bias;  // bias empty when the layer has none
};

std::vector<Layer> read_layers(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open");
  auto j = nlohmann::json::parse(in);
  std::vector<Layer> out;
  for (const auto& l : j.at("layers")) {
    Layer x;
    x.module = l.at("module").get<std::string>();
    x.kind = l.at("kind").get<std::string>();
    x.weight = l.at("weight").get<std::vector<int64_t>>();
    if (!l.at("bias").is_null()) x.bias = l.at("bias").get<std::vector<int64_t>>();
    out.push_back(std::move(x));
  }
  return out;
}

bool targetable(const Layer& l) { return l.kind == "linear" || l.kind == "conv2d"; }

LayerSpec spec_of(const Layer& l) {
  if (l.kind == "linear") return LayerSpec::linear(l.weight[1], l.weight[0], !l.bias.empty());
  const int64_t k = l.weight[2];
  return LayerSpec::conv(l.weight[1], l.weight[0], {k, l.weight[3]}, {1, 1}, {k / 2, l.weight[3] / 2});
}

// "locon_dora" → algorithm "lora" with DoRA; "<algo>" otherwise.
struct Variant {
  std::string file, algo;
  bool dora = false;
};

Variant parse_variant(const std::string& v) {
  Variant x{v, v, false};
  if (v.size() > 5 && v.substr(v.size() - 5) == "_dora") {
    x.algo = v.substr(0, v.size() - 5);
    x.dora = true;
  }
  if (x.algo == "locon") x.algo = "lora";
  return x;
}

void write_base(const std::vector<Layer>& layers, const std::string& path) {
  std::vector<io::TensorDecl> decls;
  for (const auto& l : layers) {
    decls.push_back({l.module + ".weight", io::DType::F16, l.weight});
    if (!l.bias.empty()) decls.push_back({l.module + ".bias", io::DType::F16, l.bias});
  }
  io::SafetensorsWriter w(path, decls, {{"format", "pt"}, {"generator", "lycoris-cpp bench/gen_sd15"}});
  for (const auto& l : layers) {
    // norms around 1 for their weights, everything else N(0, 0.02²)
    const bool norm = l.kind == "groupnorm" || l.kind == "layernorm";
    auto W = torch::randn(l.weight) * 0.02;
    if (norm) W = W + 1.0;
    w.write(l.module + ".weight", W.to(torch::kFloat16));
    if (!l.bias.empty()) w.write(l.module + ".bias", (torch::randn(l.bias) * 0.02).to(torch::kFloat16));
  }
  w.commit();
}

void write_adapter(const std::vector<Layer>& layers, const Variant& v, const std::string& path) {
  const auto& algo = find_algorithm(v.algo);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  size_t modules = 0;
  torch::NoGradGuard no_grad;
  for (const auto& l : layers) {
    if (!targetable(l)) continue;
    const auto spec = spec_of(l);
    if (algo.supports && !algo.supports(spec)) continue;
    auto ad = algo.create(spec, AdapterOptions().algo(algo.name).rank(16).alpha(8).dora(v.dora));
    const auto params = ad->named_parameters();
    const double n = static_cast<double>(std::max(1, static_cast<int>(params.size())));
    for (auto& p : params) {
      if (p.key() == "dora_scale" || p.key() == "scalar") continue;
      // each factor ~ N(0, σ²): products of n factors stay small; the Hadamard/Kronecker
      // structure does not matter for timing.
      p.value().copy_(torch::randn_like(p.value()) * std::pow(0.05, 1.0 / n) * 0.2);
    }
    if (v.dora) {
      // dora_scale: the norms of a plausible weight (positive, around ‖W‖)
      auto ds = ad->named_parameters()["dora_scale"];
      ds.copy_(torch::rand_like(ds) * 0.2 + 0.9);
    }
    const auto name = naming::module_name("lora_unet", l.module);
    for (auto& [suffix, t] : ad->file_tensors())
      tensors.emplace_back(name + "." + suffix, t.is_floating_point() ? t.to(torch::kFloat16) : t);
    ++modules;
  }
  io::save_file(path, tensors,
                {{"ss_network_module", "lycoris.kohya"}, {"ss_network_dim", "16"}, {"ss_network_alpha", "8"},
                 {"ss_network_args", "{\"algo\": \"" + v.file + "\"}"}, {"generator", "lycoris-cpp bench/gen_sd15"}});
  std::printf("  %-22s %3zu modules, %zu tensors, %.1f MB\n", std::filesystem::path(path).filename().c_str(), modules,
              tensors.size(), static_cast<double>(std::filesystem::file_size(path)) / 1e6);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) out.push_back(x);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string layers_path = "bench/data/sd15_unet_layers.json", out = "bench/data/out";
  std::string algos = "locon,loha,lokr,locon_dora,loha_dora,ia3";
  int64_t seed = 1234;
  bool base = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + ": missing value");
      return argv[++i];
    };
    if (a == "--layers") layers_path = next();
    else if (a == "--out") out = next();
    else if (a == "--seed") seed = std::stoll(next());
    else if (a == "--algos") algos = next();
    else if (a == "--no-base") base = false;
    else {
      std::fprintf(stderr, "usage: gen_sd15 [--layers JSON] [--out DIR] [--seed N] [--algos a,b,…] [--no-base]\n");
      return 2;
    }
  }
  try {
    torch::set_num_threads(1);  // same values whatever the machine
    torch::manual_seed(static_cast<uint64_t>(seed));
    const auto layers = read_layers(layers_path);
    std::filesystem::create_directories(out);
    const auto t0 = std::chrono::steady_clock::now();
    if (base) {
      write_base(layers, out + "/sd15_unet.safetensors");
      std::printf("  %-22s %3zu layers, %.1f MB\n", "sd15_unet.safetensors", layers.size(),
                  static_cast<double>(std::filesystem::file_size(out + "/sd15_unet.safetensors")) / 1e6);
    }
    // one LoRA module on a layer the base does not have: merged with --allow-unmatched it changes nothing
    io::save_file(out + "/untouched.safetensors",
                  {{"lycoris_not_in_the_base.lora_down.weight", torch::zeros({1, 8})},
                   {"lycoris_not_in_the_base.lora_up.weight", torch::zeros({8, 1})}},
                  {{"generator", "lycoris-cpp bench/gen_sd15"}});
    for (const auto& a : split(algos)) {
      uint64_t h = 1469598103934665603ull;  // FNV-1a of the name: each file's values independent of --algos order
      for (unsigned char c : a) h = (h ^ c) * 1099511628211ull;
      torch::manual_seed(static_cast<uint64_t>(seed) ^ h);
      write_adapter(layers, parse_variant(a), out + "/" + a + "_r16.safetensors");
    }
    std::printf("done in %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gen_sd15: %s\n", e.what());
    return 1;
  }
  return 0;
}
