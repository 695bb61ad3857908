// DyLoRA adapter module (docs/format.md#dylora, docs/training.md#dylora-blocks). Saved as a LoRA at full rank with the raw alpha.
// Training: on_step() draws a block count j+1 ∈ [1, nb]; blocks 0…j−1 are used as constants, block j is
// trained, scale alpha / ((j+1)·block_size) (= alpha / rank used: the scale the file gives that sub-model,
// the recommended fix of docs/loaders.md#q23-dylora; the reference uses alpha / (j+1)). Evaluation: full rank, alpha / r.
#pragma once
#include <torch/nn/pimpl.h>

#include "lycoris/modules/lora.hpp"

namespace lycoris {

class DyLoRAImpl : public LowRankAdapter {
 public:
  DyLoRAImpl(LayerSpec layer, AdapterOptions options);
  // From a LoRA module of a file (no Tucker / DoRA); block_size = options.block_size() if it divides r, else r.
  DyLoRAImpl(LayerSpec layer, AdapterOptions options, functional::lora::Weights weights, double alpha);

  NamedTensors file_tensors() const override;
  // The first `rank` rank channels as a LoRA module (rank a multiple of block_size, ≤ full rank), alpha kept.
  NamedTensors file_tensors(int64_t rank) const;
  int64_t rank() const override { return lora_down.size(0); }
  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return rank() / block_size_; }
  // Draws the block count j+1 ∈ [1, nb] (uniform) used by the next training forwards; also drawn once at
  // construction.
  void on_step() override;
  // Training forwards use blocks 0…n−1 (block n−1 trainable) until the next on_step; OptionError unless
  // 1 ≤ n ≤ nb.
  void set_active_blocks(int64_t n);
  int64_t active_blocks() const { return blocks_; }
  std::vector<int64_t> step_state() const override { return {blocks_}; }
  void set_step_state(const std::vector<int64_t>& state) override;

  torch::Tensor lora_down, lora_up;

 protected:
  torch::Tensor raw_diff() override;

 private:
  int64_t block_size_ = 4, blocks_ = 1;
};
TORCH_MODULE(DyLoRA);

Algorithm dylora_algorithm();

}  // namespace lycoris
