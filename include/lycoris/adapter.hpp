// The one interface every algorithm implements (modules/<algo>.cpp), used by the network, merge,
// info and the CLI. An adapter is a torch::nn::Module holding the algorithm's tensors as parameters:
// created fresh for training (Algorithm::create) or loaded from a file (Algorithm::load).
#pragma once
#include <torch/nn/module.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lycoris/layer.hpp"
#include "lycoris/options.hpp"
#include "lycoris/row_kernel.hpp"

namespace lycoris {

// suffix (e.g. "lora_up.weight") → tensor, for one module of an adapter file.
using TensorMap = std::map<std::string, torch::Tensor>;
// Ordered (suffix, tensor) pairs: the order the reference writes a module's keys in (docs/format.md#key-order).
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

class AdapterImpl : public torch::nn::Module {
 public:
  AdapterImpl(std::string algo, LayerSpec layer, AdapterOptions options);

  const std::string& algo() const { return algo_; }
  const LayerSpec& layer() const { return layer_; }
  const AdapterOptions& options() const { return options_; }

  // W' = the layer's weight with this adapter applied at multiplier m (docs/format.md#multiplier: W + m·ΔW for
  // additive algorithms; DoRA, (IA)^3, OFT/BOFT as specified). Differentiable in the adapter's
  // parameters; dropouts act only in training mode. Math in fp32 (or wider if W is wider); the result
  // has W's dtype and device.
  virtual torch::Tensor apply_weight(const torch::Tensor& W, double m) = 0;
  // b' at multiplier m; `b` may be undefined (layer without bias). Default: unchanged.
  virtual torch::Tensor apply_bias(const torch::Tensor& b, double m) { return b; }
  // Whether apply_bias can change the bias (Full's diff_b, Norm's b_norm): on a layer without bias it
  // would create one.
  virtual bool changes_bias() const { return false; }
  // The adapted layer's output for input x without materialising ΔW where the algorithm allows it.
  // Must equal layer_forward(x, layer(), apply_weight(W, m), apply_bias(b, m)).
  // Default: exactly that (materialising).
  virtual torch::Tensor bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                       double m);
  // The module's tensors as the reference writes them (suffixes, shapes, key order of docs/format.md#key-order;
  // use_scalar folded in), detached.
  virtual NamedTensors file_tensors() const = 0;
  // Rank of the low-rank factors (0 when the algorithm has none) and the stored alpha (NaN if none).
  virtual int64_t rank() const { return 0; }
  virtual double alpha() const;

  // Training hook called once per optimizer step by the network (DyLoRA picks its rank block here).
  virtual void on_step() {}
  // What on_step() drew that is neither a parameter nor a buffer (DyLoRA: the active block count), so that a
  // checkpoint saves it and data-parallel training hands rank 0's draw to every rank. Empty for most
  // algorithms; set_step_state throws OptionError (naming the adapter) on a state it cannot take.
  virtual std::vector<int64_t> step_state() const { return {}; }
  virtual void set_step_state(const std::vector<int64_t>& state);

  // In-place merging (tools::merge streams a checkpoint through these; eval mode only, else nothing):
  // A kernel applying this adapter at multiplier m in place to chunks of rows of a weight of `shape` held in
  // `compute` (dtype and device), ΔW never materialised (row_kernel.hpp); nullptr when the algorithm has
  // none for this case (the caller uses apply_weight).
  virtual std::unique_ptr<RowKernel> row_kernel(double m, const torch::TensorOptions& compute,
                                                torch::IntArrayRef shape) const;
  // ΔW at multiplier 1 when apply_weight(W, m) is W + m·ΔW with ΔW independent of W (so that a caller may
  // add m·ΔW into W in place); undefined otherwise (DoRA, (IA)^3, OFT, …). Default: undefined.
  virtual torch::Tensor additive_delta() { return {}; }

 protected:
  std::string algo_;
  LayerSpec layer_;
  AdapterOptions options_;
};

using AdapterPtr = std::shared_ptr<AdapterImpl>;

}  // namespace lycoris
