// LoKr adapter module (docs/format.md#lokr, docs/training.md#algo-lokr).
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/file_layouts.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/lokr.hpp"
#include "lycoris/modules/low_rank.hpp"

namespace lycoris {

// What the Kronecker-layout algorithms (LoKr, GLoKr) share: the layout chosen from the options, the rank of
// the low-rank factor (not a tensor's size: every factor may be full) and the scale rule
// s = alpha / rank, or 1 when no factor is low-rank (alpha ignored, also under rs_lora: docs/loaders.md#q5-lokr-full-factors-scale).
class KronAdapter : public LowRankAdapter {
 public:
  using LowRankAdapter::LowRankAdapter;
  // Rank of the low-rank factor (0 for a loaded file whose factors are all full).
  int64_t rank() const override { return rank_; }
  double scale() const override { return all_full() ? 1.0 : alpha_ / static_cast<double>(rank_); }

 protected:
  // No factor is stored low-rank.
  virtual bool all_full() const = 0;
  // Fresh adapters: validates the options (OptionError), then calls
  // choose(layer, rank, factor, decompose_both, full_matrix, unbalanced_factorization, tucker).
  // factor: −1 = automatic (the most square split), or ≥ 1: a factor that divides the dimension is taken as
  // it is, otherwise the closest split whose smaller side stays ≤ factor (docs/training.md#factorization);
  // 0 and values below −1 are OptionErrors.
  template <class Choose>
  auto fresh_layout(Choose choose) {
    check_low_rank_options(layer_, options_, algo_);
    const auto& o = options_;
    if (o.factor() == 0 || o.factor() < -1)
      throw OptionError(algo_ + " on " + layer_.describe() + ": factor must be -1 (automatic) or >= 1, got " +
                        std::to_string(o.factor()));
    return choose(layer_, o.rank(), o.factor(), o.decompose_both(), o.full_matrix(), o.unbalanced_factorization(),
                  o.tucker());
  }
  // After setup of a fresh adapter: rank = options.rank(); alpha stored as the rank when every factor is
  // full (as the reference does; the scale is 1 either way), else stored_alpha (rs_lora folded in).
  void finish_fresh();
  // After setup from a file (begin_loaded first): records rank, alpha, Tucker, DoRA, decompose_both and
  // full_matrix in options().
  void finish_loaded(int64_t rank, bool tucker, bool decompose_both);

  int64_t rank_ = 0;
};

class LoKrImpl : public KronAdapter {
 public:
  // A fresh adapter for training: layout from factorization() (docs/format.md#lokr-layout), reference initialisation
  // (ΔW = 0), OptionError on invalid options.
  LoKrImpl(LayerSpec layer, AdapterOptions options);
  // From stored factors (already validated); the layout is read from their shapes.
  LoKrImpl(LayerSpec layer, AdapterOptions options, functional::lokr::Weights weights, double alpha,
           torch::Tensor dora_scale = {});

  NamedTensors file_tensors() const override;

  // Parameters present per layout: lokr_w1 or lokr_w1_a/_b; lokr_w2 or lokr_w2_a/_b (+ lokr_t2).
  torch::Tensor lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2;

 protected:
  torch::Tensor raw_diff() override;
  torch::Tensor raw_bypass(const torch::Tensor& x, double m) override;
  bool all_full() const override { return lokr_w1.defined() && lokr_w2.defined(); }
  // W viewed (a, p, c, q·k): W[u0:u1] += c·W1[u0:u1, None, :, None]·W2[None, :, None, :] (one addcmul per
  // chunk of whole row blocks u, c = m·s).
  std::unique_ptr<RowKernel> delta_kernel(double m, const torch::TensorOptions& compute,
                                          torch::IntArrayRef shape) const override;

 private:
  void setup(functional::lokr::Weights w, torch::Tensor dora_scale);
  functional::lokr::Weights weights() const;  // scalar folded into w1 / w1_a
};
TORCH_MODULE(LoKr);

// Registry entry (docs/format.md#detection marker `lokr_w1` or `lokr_w1_a`).
Algorithm lokr_algorithm();

}  // namespace lycoris
