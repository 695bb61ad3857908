#include <lycoris/lycoris.hpp>
#include <torch/torch.h>

#include <iostream>

// Usage: readme_read ADAPTER BASE — every module of an adapter file, loaded against the base checkpoint.
int main(int argc, char** argv) {
  if (argc != 3) return 2;
  auto adapter = lycoris::load_adapter_for_base(argv[1], argv[2]);  // validated, names resolved, shapes checked
  auto base = lycoris::io::SafetensorsFile::open(argv[2]);          // zero-copy
  for (const auto& m : adapter.modules) {
    if (m.target.layer.fused()) continue;  // a q/k/v block of a fused tensor: see merge for those
    torch::Tensor W0 = base.tensor(m.target.layer.weight_key).to(torch::kFloat);
    torch::Tensor W = m.adapter->apply_weight(W0, /*multiplier=*/0.8);  // the exact merged weight
    std::cout << m.name << " (" << m.algo << ") on " << m.target.layer.weight_key << ": |ΔW| = "
              << (W - W0).norm().item<double>() << "\n";
  }
}
