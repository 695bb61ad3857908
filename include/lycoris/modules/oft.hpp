// What the Diag-OFT and BOFT modules share (docs/format.md#diag-oft, docs/format.md#boft, docs/training.md#algo-oft): the stored rotation
// blocks, the optional per-row rescale, the constraint c stored as `alpha`, the option checks and the
// file checks common to both layouts.
#pragma once
#include <functional>
#include <string>
#include <utility>

#include "lycoris/adapter.hpp"
#include "lycoris/algorithms.hpp"

namespace lycoris {

class OFTAdapter : public AdapterImpl {
 public:
  NamedTensors file_tensors() const override;  // oft_blocks, rescale?, alpha
  int64_t rank() const override { return oft_blocks.size(-1); }  // block size S
  double alpha() const override { return constraint_; }
  double constraint() const { return constraint_; }

  torch::Tensor oft_blocks, rescale;

 protected:
  // Fresh adapter: validates the options (check_oft_options), then registers `init` = (blocks, rescale?).
  OFTAdapter(const std::string& algo, const LayerSpec& layer, const AdapterOptions& options,
             const std::function<std::pair<torch::Tensor, torch::Tensor>()>& init);
  // From stored tensors (shapes already checked); rescale and alpha may be undefined (alpha → 0).
  OFTAdapter(const std::string& algo, const LayerSpec& layer, const torch::Tensor& blocks, const torch::Tensor& rescale,
             const torch::Tensor& alpha);

  double constraint_ = 0;

 private:
  torch::Tensor alpha_tensor_;  // as stored (dtype and shape), on the CPU, for file_tensors; not a buffer, so
                                // Module::to(dtype) cannot turn an int64 alpha into a float
};

// check_options for Diag-OFT / BOFT plus their own: rank (the block-size bound) positive or −1, constraint >= 0.
// The traits of Diag-OFT and BOFT modules (algorithms.hpp): rescale, the constraint (0, or below ‖Q‖).
Traits oft_traits(const std::string& module, const TensorMap& tensors);
void check_oft_options(const std::string& algo, const LayerSpec& layer, const AdapterOptions& options);
// The checks both OFT loaders share: supported layer (ShapeError), known keys, rescale (O, 1, …), a numeric
// alpha. Returns oft_blocks.
const torch::Tensor& check_oft_file(const std::string& algo, const std::string& module, const TensorMap& tensors,
                                    const LayerSpec& layer);

}  // namespace lycoris
