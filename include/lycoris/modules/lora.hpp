// LoRA / LoCon adapter module (docs/format.md#lora, docs/training.md#algo-lora).
#pragma once
#include <torch/nn/pimpl.h>

#include <string>

#include "lycoris/adapter.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/file_layouts.hpp"
#include "lycoris/functional/lora.hpp"
#include "lycoris/modules/low_rank.hpp"

namespace lycoris {

class LoRAImpl : public LowRankAdapter {
 public:
  // A fresh adapter for training: reference initialisation (ΔW = 0), OptionError on invalid options.
  LoRAImpl(LayerSpec layer, AdapterOptions options);
  // From stored factors (already validated); `alpha` is the stored alpha (scale = alpha / r).
  LoRAImpl(LayerSpec layer, AdapterOptions options, functional::lora::Weights weights, double alpha,
           torch::Tensor dora_scale = {});

  NamedTensors file_tensors() const override;
  int64_t rank() const override { return lora_down.size(0); }
  // Sparse-bias residual of extracted files (docs/format.md#sparse-bias): the stored COO tensors, kept for saving,
  // and added densely (unscaled) to ΔW.
  void set_sparse_bias(torch::Tensor indices, torch::Tensor values, torch::Tensor size);

  torch::Tensor lora_down, lora_up, lora_mid;  // parameters (lora_mid only with Tucker)

 protected:
  torch::Tensor raw_diff() override;
  torch::Tensor raw_bypass(const torch::Tensor& x, double m) override;
  // W[r0:r1] += c·up[r0:r1]·down (one addmm per chunk, c = m·s) + m·sparse[r0:r1]; not with Tucker.
  std::unique_ptr<RowKernel> delta_kernel(double m, const torch::TensorOptions& compute,
                                          torch::IntArrayRef shape) const override;
  bool delta_kernel_differentiable() const override { return true; }

 private:
  void setup(functional::lora::Weights w, torch::Tensor dora_scale);
  functional::lora::Weights weights() const;  // scalar folded into up
  torch::Tensor sparse_dense_;
  NamedTensors sparse_keys_;
};
TORCH_MODULE(LoRA);

// A LoRA module of a file, validated against the layer (docs/format.md#lora) and copied into owned tensors.
struct LoRAFile {
  functional::lora::Weights weights;
  double alpha = 0;
  torch::Tensor dora_scale;                          // undefined without DoRA
  torch::Tensor bias_indices, bias_values, bias_size;  // undefined without sparse bias
};
LoRAFile read_lora_file(const std::string& module, const TensorMap& tensors, const LayerSpec& layer);

// Registry entry (docs/format.md#detection marker `lora_up.weight`); also reads DyLoRA and extracted files.
Algorithm lora_algorithm();

}  // namespace lycoris
