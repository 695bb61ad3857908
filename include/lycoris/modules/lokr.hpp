// LoKr adapter module (FORMAT.md §5.3, TRAINING.md §4.3).
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/functional/lokr.hpp"
#include "lycoris/modules/lora.hpp"

namespace lycoris {

class LoKrImpl : public LowRankAdapter {
 public:
  // A fresh adapter for training: layout from factorization() (FORMAT.md §5.3), reference initialisation
  // (ΔW = 0), OptionError on invalid options.
  LoKrImpl(LayerSpec layer, AdapterOptions options);
  // From stored factors (already validated); the layout is read from their shapes.
  LoKrImpl(LayerSpec layer, AdapterOptions options, functional::lokr::Weights weights, double alpha,
           torch::Tensor dora_scale = {});

  NamedTensors file_tensors() const override;
  // Rank of the low-rank factor (0 for a loaded file whose two factors are full).
  int64_t rank() const override { return rank_; }
  // alpha / rank, or 1 when both Kronecker factors are full (alpha ignored, also under rs_lora: Q5).
  double scale() const override;

  // Parameters present per layout: lokr_w1 or lokr_w1_a/_b; lokr_w2 or lokr_w2_a/_b (+ lokr_t2).
  torch::Tensor lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2;

 protected:
  torch::Tensor raw_diff() override;
  torch::Tensor raw_bypass(const torch::Tensor& x, double m) override;

 private:
  void setup(functional::lokr::Weights w, torch::Tensor dora_scale);
  functional::lokr::Weights weights() const;  // scalar folded into w1 / w1_a
  int64_t rank_ = 0;
};
TORCH_MODULE(LoKr);

// Registry entry (FORMAT.md §3 marker `lokr_w1` or `lokr_w1_a`).
Algorithm lokr_algorithm();

}  // namespace lycoris
