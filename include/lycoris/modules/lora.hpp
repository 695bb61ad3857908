// LoRA / LoCon adapter module (FORMAT.md §5.1, TRAINING.md §4.1).
#pragma once
#include <torch/nn/pimpl.h>

#include <string>

#include "lycoris/adapter.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/functional/lora.hpp"

namespace lycoris {

// What the additive low-rank algorithms (LoRA, LoHa, LoKr, DyLoRA) share: the trainable scalar, DoRA,
// the dropout family of TRAINING.md §3 and W' = W + m·ΔW. Subclasses provide ΔW and (optionally) ΔW·x.
class LowRankAdapter : public AdapterImpl {
 public:
  using AdapterImpl::AdapterImpl;

  // Module dropout (training), then W + m·ΔW, or the DoRA rule when dora_scale is present.
  torch::Tensor apply_weight(const torch::Tensor& W, double m) override;
  // layer(x, W, b) + m·ΔW·x without materialising ΔW where the subclass can (DoRA: materialised, so
  // bypass = rebuild); neuron dropout on the delta in training.
  torch::Tensor bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                               double m) override;
  double alpha() const override { return alpha_; }

  // The scale s applied to the factors' product (alpha / rank unless the algorithm says otherwise).
  virtual double scale() const { return alpha_ / static_cast<double>(rank()); }
  // ΔW at multiplier 1 from the live parameters (scale and scalar included; rows dropped by
  // rank_dropout in training mode, TRAINING.md §4.1).
  torch::Tensor diff_weight();
  // dora_scale ← the norms of the host weight W (FORMAT.md §4.3). A fresh DoRA adapter does this
  // automatically on its first apply_weight / bypass_forward; the parameter keeps its identity.
  void init_dora(const torch::Tensor& W);

  torch::Tensor scalar;      // trainable σ (init 0) with use_scalar, else a constant-1 buffer
  torch::Tensor dora_scale;  // parameter with DoRA, else undefined

 protected:
  // ΔW at multiplier 1 including s and the scalar, without training effects.
  virtual torch::Tensor raw_diff() = 0;
  // m·ΔW·x without materialising ΔW (training masks included), or undefined to use m·ΔW materialised.
  virtual torch::Tensor raw_bypass(const torch::Tensor& x, double m) { return {}; }
  // Registers `scalar` (per options().use_scalar()) and `dora_scale`: `loaded` when given, else fresh
  // (ones, filled from W on first use) when options().dora().
  void setup_common(const torch::TensorOptions& param_options, torch::Tensor loaded_dora_scale);
  // Constructors from a file: begin_loaded before setup (files carry no scalar and the rs_lora factor is in
  // alpha), record_loaded after it (options() then says what the file holds: rank, alpha, Tucker, DoRA axis).
  void begin_loaded(double alpha);
  void record_loaded(int64_t rank, bool tucker);
  // Output channels of a bypass delta dropped like the rows of ΔW (rank_dropout in training).
  torch::Tensor drop_out_channels(const torch::Tensor& delta) const;
  torch::Tensor merged(const torch::Tensor& W, double m);

  double alpha_ = 0;
  bool dora_ready_ = true;
};

class LoRAImpl : public LowRankAdapter {
 public:
  // A fresh adapter for training: reference initialisation (ΔW = 0), OptionError on invalid options.
  LoRAImpl(LayerSpec layer, AdapterOptions options);
  // From stored factors (already validated); `alpha` is the stored alpha (scale = alpha / r).
  LoRAImpl(LayerSpec layer, AdapterOptions options, functional::lora::Weights weights, double alpha,
           torch::Tensor dora_scale = {});

  NamedTensors file_tensors() const override;
  int64_t rank() const override { return lora_down.size(0); }
  // Sparse-bias residual of extracted files (FORMAT.md §5.1.1): the stored COO tensors, kept for saving,
  // and added densely (unscaled) to ΔW.
  void set_sparse_bias(torch::Tensor indices, torch::Tensor values, torch::Tensor size);

  torch::Tensor lora_down, lora_up, lora_mid;  // parameters (lora_mid only with Tucker)

 protected:
  torch::Tensor raw_diff() override;
  torch::Tensor raw_bypass(const torch::Tensor& x, double m) override;

 private:
  void setup(functional::lora::Weights w, torch::Tensor dora_scale);
  functional::lora::Weights weights() const;  // scalar folded into up
  torch::Tensor sparse_dense_;
  NamedTensors sparse_keys_;
};
TORCH_MODULE(LoRA);

// --- shared by the low-rank family (LoRA, LoHa, LoKr, DyLoRA) ---
// check_options (modules/common.hpp) for Linear/Conv hosts with a rank: OptionError "<algo> on <layer>: <reason>"
// for an unsupported layer (not Linear/Conv, grouped conv), rank < 1 or a dropout probability outside [0, 1].
void check_low_rank_options(const LayerSpec& layer, const AdapterOptions& options, const std::string& algo);
// The alpha stored in files for these options (FORMAT.md §4.1): α = options.alpha (0 → rank), times
// rank / √rank with rs_lora, so that scale = alpha / rank is the training scale.
double stored_alpha(const AdapterOptions& options);
// The stored alpha of a module (any numeric dtype, shape () or (1,)); `rank` when absent (FORMAT.md §3).
// FormatError for a finite alpha beyond the float32 range (the scale is applied in float32).
double read_alpha(const TensorMap& tensors, const std::string& module, int64_t rank);

// A LoRA module of a file, validated against the layer (FORMAT.md §5.1) and copied into owned tensors.
struct LoRAFile {
  functional::lora::Weights weights;
  double alpha = 0;
  torch::Tensor dora_scale;                          // undefined without DoRA
  torch::Tensor bias_indices, bias_values, bias_size;  // undefined without sparse bias
};
LoRAFile read_lora_file(const std::string& module, const TensorMap& tensors, const LayerSpec& layer);

// Registry entry (FORMAT.md §3 marker `lora_up.weight`); also reads DyLoRA and extracted files.
Algorithm lora_algorithm();

}  // namespace lycoris
