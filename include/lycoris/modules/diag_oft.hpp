// Diag-OFT adapter (FORMAT.md §5.8, TRAINING.md §4.8): block-diagonal Cayley rotations of W's output
// rows (transposed, QUIRKS Q16), optional per-row rescale; `alpha` stores the constraint c.
#pragma once
#include <torch/nn/pimpl.h>

#include <string>

#include "lycoris/adapter.hpp"

namespace lycoris {

class DiagOFTImpl : public AdapterImpl {
 public:
  // Fresh adapter: (S, N) = factorization(O, rank) (QUIRKS Q17), blocks 0 (R = I), rescale 1 when
  // options.rescaled(), constraint options.constraint().
  DiagOFTImpl(const LayerSpec& layer, const AdapterOptions& options);
  // From stored tensors (shapes already checked); rescale and alpha may be undefined (alpha → 0).
  DiagOFTImpl(const LayerSpec& layer, const torch::Tensor& oft_blocks, const torch::Tensor& rescale,
              const torch::Tensor& alpha);

  // Training: rank_dropout is inverted dropout on the entries of m·R (QUIRKS Q51).
  torch::Tensor apply_weight(const torch::Tensor& W, double m) override;
  // op(x, W) rotated on its channel axis, rescaled, + b (the bias is not rotated).
  torch::Tensor bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                               double m) override;
  NamedTensors file_tensors() const override;  // oft_blocks, rescale?, alpha
  int64_t rank() const override { return oft_blocks.size(-1); }  // block size S
  double alpha() const override { return constraint_; }
  double constraint() const { return constraint_; }

  torch::Tensor oft_blocks, rescale;

 private:
  double dropout() const { return is_training() ? options_.rank_dropout() : 0.0; }
  double constraint_;
  torch::Tensor alpha_tensor_;  // as stored (dtype and shape), on the CPU, for file_tensors; not a buffer, so
                                // Module::to(dtype) cannot turn an int64 alpha into a float
};
TORCH_MODULE(DiagOFT);

// check_options for Diag-OFT / BOFT plus their own: rank (the block-size bound) positive or −1, constraint >= 0.
void check_oft_options(const std::string& algo, const LayerSpec& layer, const AdapterOptions& options);

}  // namespace lycoris
