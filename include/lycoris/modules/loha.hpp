// LoHa adapter module (docs/format.md#loha, docs/training.md#algo-loha).
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/file_layouts.hpp"
#include "lycoris/functional/loha.hpp"
#include "lycoris/modules/low_rank.hpp"

namespace lycoris {

class LoHaImpl : public LowRankAdapter {
 public:
  // A fresh adapter for training: reference initialisation (ΔW = 0), OptionError on invalid options.
  LoHaImpl(LayerSpec layer, AdapterOptions options);
  // From stored factors (already validated); scale = alpha / hada_w1_b.size(0).
  LoHaImpl(LayerSpec layer, AdapterOptions options, functional::loha::Weights weights, double alpha,
           torch::Tensor dora_scale = {});

  NamedTensors file_tensors() const override;
  int64_t rank() const override { return hada_w1_b.size(0); }

  torch::Tensor hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2;  // t1/t2 only with Tucker

 protected:
  torch::Tensor raw_diff() override;
  torch::Tensor raw_bypass(const torch::Tensor& x, double m) override;
  // W[r0:r1] += c·(w1a[r0:r1]·w1b) ⊙ (w2a[r0:r1]·w2b) (two small mm, one addcmul per chunk, c = m·s); not
  // with Tucker.
  std::unique_ptr<RowKernel> delta_kernel(double m, const torch::TensorOptions& compute,
                                          torch::IntArrayRef shape) const override;

 private:
  void setup(functional::loha::Weights w, torch::Tensor dora_scale);
  functional::loha::Weights weights() const;  // scalar folded into w1a
};
TORCH_MODULE(LoHa);

// Registry entry (docs/format.md#detection marker `hada_w1_a`).
Algorithm loha_algorithm();

}  // namespace lycoris
