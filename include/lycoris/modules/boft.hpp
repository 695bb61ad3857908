// BOFT adapter (docs/format.md#boft, docs/training.md#algo-oft): butterfly stages of Cayley rotations of W's output
// rows (un-transposed, docs/loaders.md#q16-oft-rotation-direction), optional per-row rescale; `alpha` stores the constraint c.
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/modules/oft.hpp"

namespace lycoris {

class BOFTImpl : public OFTAdapter {
 public:
  // Fresh adapter: (S, N) = power2factorization(O, rank), OptionError when none exists (docs/loaders.md#q22-boft-layout);
  // blocks 0 (M, N, S, S), rescale 1 when options.rescaled(), constraint options.constraint().
  BOFTImpl(const LayerSpec& layer, const AdapterOptions& options);
  // From stored tensors (shapes already checked); rescale and alpha may be undefined (alpha → 0).
  BOFTImpl(const LayerSpec& layer, const torch::Tensor& oft_blocks, const torch::Tensor& rescale,
           const torch::Tensor& alpha);

  torch::Tensor apply_weight(const torch::Tensor& W, double m) override;
  // op(x, W) through the butterfly on its channel axis, rescaled, + b (the bias is not rotated).
  torch::Tensor bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                               double m) override;
};
TORCH_MODULE(BOFT);

}  // namespace lycoris
