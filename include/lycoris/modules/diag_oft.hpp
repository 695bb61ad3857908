// Diag-OFT adapter (docs/format.md#diag-oft, docs/training.md#algo-oft): block-diagonal Cayley rotations of W's output
// rows (transposed, docs/loaders.md#q16-oft-rotation-direction), optional per-row rescale; `alpha` stores the constraint c.
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/modules/oft.hpp"

namespace lycoris {

class DiagOFTImpl : public OFTAdapter {
 public:
  // Fresh adapter: (S, N) = factorization(O, rank) (docs/loaders.md#q17-diag-oft-block-size), blocks 0 (R = I), rescale 1 when
  // options.rescaled(), constraint options.constraint().
  DiagOFTImpl(const LayerSpec& layer, const AdapterOptions& options);
  // From stored tensors (shapes already checked); rescale and alpha may be undefined (alpha → 0).
  DiagOFTImpl(const LayerSpec& layer, const torch::Tensor& oft_blocks, const torch::Tensor& rescale,
              const torch::Tensor& alpha);

  // Training: rank_dropout is inverted dropout on the entries of m·R (docs/loaders.md#q51-diag-oft-dropout).
  torch::Tensor apply_weight(const torch::Tensor& W, double m) override;
  // op(x, W) rotated on its channel axis, rescaled, + b (the bias is not rotated).
  torch::Tensor bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                               double m) override;

 private:
  double dropout() const { return is_training() ? options_.rank_dropout() : 0.0; }
};
TORCH_MODULE(DiagOFT);

}  // namespace lycoris
