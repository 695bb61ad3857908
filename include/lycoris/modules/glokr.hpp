// GLoKr adapter module (docs/glokr.md): ΔW = s·σ·(W ×_in (A1 ⊗ A2) + B1 ⊗ B2), B laid out like LoKr
// (docs/format.md#lokr), s = alpha / r (1 when no factor is low-rank), σ the optional trainable scalar.
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/functional/glokr.hpp"
#include "lycoris/modules/lokr.hpp"

namespace lycoris {

// Shares the low-rank machinery (scalar, DoRA, dropout family, W' = W + m·ΔW) with LoKr; ΔW depends on the
// current host weight W, which apply_weight / bypass_forward hand to raw_diff / raw_bypass.
class GLoKrImpl : public KronAdapter {
 public:
  // A fresh adapter for training: LoKr's layout rules for B, A2 low-rank iff 2r < q (and not full_matrix),
  // ΔW = 0 at init; OptionError on invalid options.
  GLoKrImpl(LayerSpec layer, AdapterOptions options);
  // From stored factors (already validated); the layout is read from their shapes.
  GLoKrImpl(LayerSpec layer, AdapterOptions options, functional::glokr::Weights weights, double alpha,
            torch::Tensor dora_scale = {});

  torch::Tensor apply_weight(const torch::Tensor& W, double m) override;
  torch::Tensor bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                               double m) override;
  // Undefined: ΔW depends on W.
  torch::Tensor additive_delta() override { return {}; }
  // Key order: alpha, dora_scale?, glokr_a_w1, glokr_a_w2 | glokr_a_w2_a, glokr_a_w2_b,
  // glokr_b_w1 | glokr_b_w1_a, glokr_b_w1_b, glokr_b_w2 | glokr_b_w2_a, glokr_b_w2_b, glokr_b_t2?
  // (the scalar folded into glokr_a_w1 and glokr_b_w1 / glokr_b_w1_a).
  NamedTensors file_tensors() const override;

  torch::Tensor glokr_a_w1, glokr_a_w2, glokr_a_w2_a, glokr_a_w2_b;  // A1 (p, p); A2 (q, q) or (q, r)·(r, q)
  torch::Tensor glokr_b_w1, glokr_b_w1_a, glokr_b_w1_b, glokr_b_w2, glokr_b_w2_a, glokr_b_w2_b, glokr_b_t2;

 protected:
  torch::Tensor raw_diff() override;
  torch::Tensor raw_bypass(const torch::Tensor& x, double m) override;
  bool all_full() const override { return functional::glokr::all_full(weights()); }

 private:
  void setup(functional::glokr::Weights w, torch::Tensor dora_scale);
  functional::glokr::Weights weights() const;  // scalar folded into A1 and B1 (or B1a)
  const torch::Tensor& host() const;
  torch::Tensor host_;  // the host weight of the current apply_weight / bypass_forward call
};
TORCH_MODULE(GLoKr);

// Registry entry (marker `glokr_a_w1`).
Algorithm glokr_algorithm();

}  // namespace lycoris
