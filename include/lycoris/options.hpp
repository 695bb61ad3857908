// Options of every adapter algorithm, with chained setters in the libtorch style:
//   lycoris::LoKrOptions().rank(8).factor(-1).tucker(true)
// One struct for all algorithms (each reads the fields it knows), so presets and per-module
// overrides can be applied uniformly; the per-algorithm names are aliases.
#pragma once
#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace lycoris {

struct AdapterOptions {
  TORCH_ARG(std::string, algo) = "lora";  // registry name: lora, loha, lokr, full, ia3, dylora, glora, diag-oft, boft, norm, glokr
  TORCH_ARG(int64_t, rank) = 4;           // lora_dim
  TORCH_ARG(double, alpha) = 1.0;         // 0 → alpha = rank (scale 1)
  TORCH_ARG(bool, tucker) = false;        // use_tucker (convs with a kernel > 1 only)
  TORCH_ARG(bool, use_scalar) = false;    // trainable scalar multiplying ΔW, folded on save
  TORCH_ARG(bool, dora) = false;          // weight_decompose (DoRA)
  TORCH_ARG(bool, wd_on_out) = true;      // DoRA norm per output row (true) or per input column
  TORCH_ARG(bool, rs_lora) = false;       // scale alpha/sqrt(r)
  TORCH_ARG(double, dropout) = 0.0;       // dropout on the input
  TORCH_ARG(double, rank_dropout) = 0.0;  // dropout on the rank / output rows
  TORCH_ARG(bool, rank_dropout_scale) = false;
  TORCH_ARG(double, module_dropout) = 0.0;  // probability to skip the adapter for a step
  TORCH_ARG(int64_t, factor) = -1;          // LoKr/GLoKr factorization factor
  TORCH_ARG(bool, decompose_both) = false;
  TORCH_ARG(bool, full_matrix) = false;
  TORCH_ARG(bool, unbalanced_factorization) = false;
  TORCH_ARG(int64_t, block_size) = 4;       // DyLoRA rank block
  TORCH_ARG(double, constraint) = 0.0;      // Diag-OFT/BOFT Cayley constraint (0 = none)
  TORCH_ARG(bool, rescaled) = false;        // Diag-OFT/BOFT per-row rescale
  TORCH_ARG(bool, train_on_input) = false;  // (IA)^3 scales input columns
  TORCH_ARG(bool, bypass_mode) = false;     // y = W0·x + ΔW·x without materialising ΔW
};

using LoRAOptions = AdapterOptions;
using LoConOptions = AdapterOptions;
using LoHaOptions = AdapterOptions;
using LoKrOptions = AdapterOptions;
using FullOptions = AdapterOptions;
using IA3Options = AdapterOptions;
using DyLoRAOptions = AdapterOptions;
using GLoRAOptions = AdapterOptions;
using GLoKrOptions = AdapterOptions;
using DiagOFTOptions = AdapterOptions;
using BOFTOptions = AdapterOptions;
using NormOptions = AdapterOptions;

}  // namespace lycoris
