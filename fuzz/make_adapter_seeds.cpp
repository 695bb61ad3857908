// Seed corpus for fuzz_adapter_load (inputs in the format of adapter_input.hpp):
// - golden: modules of tests/data/golden/<case>/adapter.safetensors byte for byte, with the host layer their
//   base weight gives (per case, the first module of each algorithm and layer kind);
// - fresh: every registry algorithm created on a few layers with several option sets, parameters perturbed
//   (GLoKr, Norm, Tucker, DoRA and the LoKr layouts have no or few golden modules), and a LoRA with a sparse
//   bias. Usage: make_adapter_seeds GOLDEN_DIR OUT_DIR
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "adapter_input.hpp"
#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"

namespace fs = std::filesystem;
namespace fz = lycoris::fuzz;
using lycoris::LayerSpec;

namespace {

fz::Input input_for(const LayerSpec& layer, uint8_t flags) {
  fz::Input in;
  in.kind = static_cast<uint8_t>(layer.kind);
  in.out = static_cast<uint8_t>(layer.out_features);
  in.in = static_cast<uint8_t>(layer.in_features);
  for (size_t k = 0; k < layer.kernel.size(); ++k) {  // stride 1, padding 0, dilation 1
    in.kernel.push_back(static_cast<uint8_t>(layer.kernel[k]));
    in.stride.push_back(0);
    in.padding.push_back(0);
    in.dilation.push_back(0);
  }
  if (layer.kind == lycoris::LayerKind::GroupNorm) in.groups = static_cast<uint8_t>(layer.groups - 1);
  in.flags = (layer.has_bias ? fz::kHasBias : 0) | flags;
  return in;
}

// DyLoRA files are LoRA files to detection: force its loader.
void force_undetected(const std::string& algo, fz::Input& in) {
  const auto& registry = lycoris::algorithms();
  for (size_t a = 0; a < registry.size(); ++a)
    if (registry[a].name == algo && !registry[a].detect) in.algo = static_cast<uint8_t>(16 + a);
}

fz::TensorDesc desc(const std::string& suffix, const torch::Tensor& t) {
  fz::TensorDesc d;
  d.name = std::string(fz::module_by_index(0)) + "." + suffix;
  const auto c = t.detach().contiguous().cpu();
  d.dtype = lycoris::io::dtype_name(lycoris::io::from_torch(c.scalar_type()));
  d.shape = c.sizes().vec();
  const auto* p = static_cast<const uint8_t*>(c.data_ptr());
  d.payload.assign(p, p + c.nbytes());
  return d;
}

// Writes the seed after checking that the format round-trips it.
bool write_seed(const fs::path& dir, const std::string& name, const fz::Input& in) {
  const auto bytes = fz::encode(in);
  fz::Input back;
  bool same = fz::decode(bytes.data(), bytes.size(), back) && back.tensors.size() == in.tensors.size();
  for (size_t t = 0; same && t < in.tensors.size(); ++t)
    same = back.tensors[t].name == in.tensors[t].name && back.tensors[t].shape == in.tensors[t].shape &&
           back.tensors[t].payload == in.tensors[t].payload;
  if (!same) {
    std::fprintf(stderr, "make_adapter_seeds: %s does not round-trip through the input format\n", name.c_str());
    return false;
  }
  std::ofstream(dir / name, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: make_adapter_seeds GOLDEN_DIR OUT_DIR\n");
    return 2;
  }
  const fs::path out = argv[2];
  fs::create_directories(out);
  int written = 0;

  for (const auto& dir : fs::directory_iterator(argv[1])) {
    const auto adapter = dir.path() / "adapter.safetensors", base = dir.path() / "base.safetensors";
    if (!fs::exists(adapter) || !fs::exists(base)) continue;
    const std::string name = dir.path().filename().string();
    lycoris::LoadedAdapter loaded;
    try {
      loaded = lycoris::load_adapter_for_base(adapter.string(), base.string());
    } catch (const lycoris::Error& e) {
      std::fprintf(stderr, "make_adapter_seeds: skipping %s: %s\n", name.c_str(), e.what());
      continue;
    }
    const auto file = lycoris::io::SafetensorsFile::open(adapter.string());
    std::set<std::pair<std::string, std::string>> seen;  // (algorithm, layer kind)
    for (const auto& m : loaded.modules) {
      if (!seen.insert({m.algo, to_string(m.layer.kind)}).second) continue;
      auto in = input_for(m.layer, fz::kBypass | fz::kRoundTrip | (seen.size() % 2 ? 0 : fz::kForBase));
      force_undetected(name.substr(0, name.find('_')), in);
      for (const auto& t : file.tensors()) {
        if (t.name.rfind(m.name + ".", 0) != 0) continue;
        fz::TensorDesc d;
        d.name = std::string(fz::module_by_index(0)) + t.name.substr(m.name.size());
        d.dtype = lycoris::io::dtype_name(t.dtype);
        d.shape = t.shape;
        const uint8_t* p = file.data(t);
        d.payload.assign(p, p + t.nbytes());
        in.tensors.push_back(std::move(d));
      }
      if (!write_seed(out, name + "_" + std::to_string(seen.size()), in)) return 1;
      ++written;
    }
  }

  torch::manual_seed(0);
  torch::NoGradGuard no_grad;
  const std::vector<std::pair<std::string, LayerSpec>> layers = {
      {"linear", LayerSpec::linear(8, 8)},           {"conv1d", LayerSpec::conv(4, 8, {3})},
      {"conv2d", LayerSpec::conv(4, 8, {3, 3})},     {"conv3d", LayerSpec::conv(2, 4, {1, 3, 3})},
      {"layernorm", LayerSpec::layer_norm(8)},       {"groupnorm", LayerSpec::group_norm(2, 8)}};
  using O = lycoris::AdapterOptions;
  const std::vector<std::pair<std::string, O>> variants = {
      {"plain", O().rank(2).alpha(3)},
      {"tucker", O().rank(2).alpha(3).tucker(true)},
      {"dora", O().rank(2).alpha(3).dora(true)},
      {"dora_in", O().rank(2).alpha(3).dora(true).wd_on_out(false)},
      {"both", O().rank(1).decompose_both(true).factor(2)},
      {"full", O().rank(2).full_matrix(true).factor(2)},
      {"oft", O().rank(4).constraint(0.5).rescaled(true)},
      {"input", O().train_on_input(true)}};
  for (const auto& algo : lycoris::algorithms()) {
    std::set<std::string> files;  // distinct file contents only
    for (const auto& [lname, layer] : layers) {
      if (algo.supports && !algo.supports(layer)) continue;
      for (const auto& [vname, options] : variants) {
        lycoris::AdapterPtr a;
        try {
          a = algo.create(layer, O(options).algo(algo.name));
        } catch (const lycoris::Error&) {
          continue;
        }
        for (auto& p : a->parameters()) p.add_(torch::randn_like(p) * 0.3);
        auto in = input_for(layer, fz::kBypass | fz::kRoundTrip | (files.size() % 2 ? fz::kForBase : 0));
        force_undetected(algo.name, in);
        std::string key;
        for (const auto& [suffix, t] : a->file_tensors()) {
          in.tensors.push_back(desc(suffix, t));
          key += suffix + c10::str(t.sizes()) + ";";
        }
        if (!files.insert(lname + key).second) continue;
        if (!write_seed(out, "fresh_" + algo.name + "_" + lname + "_" + vname, in)) return 1;
        ++written;
      }
    }
  }

  // extracted LoRA files may carry a sparse bias residual (bias_indices / bias_values / bias_size)
  const auto layer = LayerSpec::linear(8, 8);
  auto in = input_for(layer, fz::kBypass | fz::kRoundTrip);
  in.tensors = {desc("alpha", torch::tensor(2.f)), desc("lora_up.weight", torch::randn({8, 2}) * 0.3),
                desc("lora_down.weight", torch::randn({2, 8}) * 0.3),
                desc("bias_indices", torch::tensor({0, 5, 3, 7}, torch::kInt64).reshape({2, 2})),
                desc("bias_values", torch::tensor({0.5f, -0.25f})),
                desc("bias_size", torch::tensor({8, 8}, torch::kInt64))};
  if (!write_seed(out, "fresh_lora_sparse_bias", in)) return 1;
  ++written;

  std::printf("make_adapter_seeds: %d seeds in %s\n", written, argv[2]);
  return 0;
}
