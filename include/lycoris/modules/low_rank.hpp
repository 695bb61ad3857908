// The base of the additive low-rank algorithms (LoRA, LoHa, LoKr, DyLoRA; GLoKr through LoKr's layout):
// the trainable scalar, DoRA, the dropouts (docs/training.md#dropout) and W' = W + m·ΔW.
#pragma once
#include <torch/types.h>

#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "lycoris/adapter.hpp"
#include "lycoris/algorithms.hpp"

namespace lycoris {

// Subclasses provide ΔW, optionally ΔW·x (bypass) and the in-place row kernel of ΔW (merge).
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
  // The subclass's delta_kernel, wrapped in the DoRA rule when dora_scale is present (eval mode, 2-D or
  // wider weights).
  std::unique_ptr<RowKernel> row_kernel(double m, const torch::TensorOptions& compute,
                                        torch::IntArrayRef shape) const override;
  // diff_weight() in eval mode without DoRA, else undefined.
  torch::Tensor additive_delta() override;

  // The scale s applied to the factors' product (alpha / rank unless the algorithm says otherwise).
  virtual double scale() const { return alpha_ / static_cast<double>(rank()); }
  // ΔW at multiplier 1 from the live parameters (scale and scalar included; rows dropped by
  // rank_dropout in training mode, docs/training.md#dropout).
  torch::Tensor diff_weight();
  // dora_scale ← the norms of the host weight W (docs/format.md#dora). A fresh DoRA adapter does this
  // automatically on its first apply_weight / bypass_forward; the parameter keeps its identity.
  void init_dora(const torch::Tensor& W);

  torch::Tensor scalar;      // trainable σ (init 0) with use_scalar, else a constant-1 buffer
  torch::Tensor dora_scale;  // parameter with DoRA, else undefined

 protected:
  // ΔW at multiplier 1 including s and the scalar, without training effects.
  virtual torch::Tensor raw_diff() = 0;
  // m·ΔW·x without materialising ΔW (training masks included), or undefined to use m·ΔW materialised.
  virtual torch::Tensor raw_bypass(const torch::Tensor& x, double m) { return {}; }
  // W[r0:r1] += m·ΔW[r0:r1] from the factors (s and the scalar included), or nullptr: no kernel for this
  // layout, or factors not in `compute`'s dtype and device (the caller then gets apply_weight's rounding).
  virtual std::unique_ptr<RowKernel> delta_kernel(double m, const torch::TensorOptions& compute,
                                                  torch::IntArrayRef shape) const {
    return nullptr;
  }
  // True when delta_kernel is built from differentiable torch ops (no out= buffers): training then builds
  // W' with it (merged()).
  virtual bool delta_kernel_differentiable() const { return false; }
  // m·scale() is representable in `dtype` (the kernels pass it to torch as a scalar of that type).
  bool kernel_scalar_fits(double m, caffe2::TypeMeta dtype) const;
  // Every defined tensor of `factors` is in `compute`'s dtype and on its device.
  static bool in_compute(const torch::TensorOptions& compute, std::initializer_list<torch::Tensor> factors);
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

// The option checks every adapter shares, for Linear/Conv hosts with a rank: OptionError "<algo> on <layer>: <reason>"
// for an unsupported layer (not Linear/Conv, grouped conv), rank < 1 or a dropout probability outside [0, 1].
void check_low_rank_options(const LayerSpec& layer, const AdapterOptions& options, const std::string& algo);
// The alpha stored in files for these options (docs/format.md#alpha): α = options.alpha (0 → rank), times
// rank / √rank with rs_lora, so that scale = alpha / rank is the training scale.
double stored_alpha(const AdapterOptions& options);
// The stored alpha of a module (any numeric dtype, shape () or (1,)); `rank` when absent (docs/format.md#alpha).
double read_alpha(const TensorMap& tensors, const std::string& module, int64_t rank);

// Registry pieces the low-rank family shares (algorithms.hpp):
// the options LoRA and LoHa read, and LoKr/GLoKr (plus the factorization's);
const std::vector<std::string>& low_rank_options();
const std::vector<std::string>& lokr_options();
// the traits they share (algorithms.hpp): dora_scale's axis, alpha (missing, ≠ rank), a sparse-bias residual;
Traits low_rank_traits(const std::string& module, const TensorMap& tensors, int64_t rank);
// PEFT's form: DoRA is LoRA's only (refused for `algo` ≠ "lora"), the scale folded into `fold_key`'s factor;
PeftForm low_rank_peft_form(const std::string& algo, const TensorMap& tensors, double scale, const std::string& fold_key);
// from PEFT (unless the module has an alpha): alpha = scale·rank, or the scale folded into `fold_key` where no rank reads alpha (LoKr, both full).
void low_rank_from_peft(TensorMap& tensors, double scale, int64_t rank, const std::string& fold_key);
// Whether dora_scale is (1, in, …): the input-axis convention of LyCORIS < 3.2.
bool dora_on_input_axis(const TensorMap& tensors);

}  // namespace lycoris
