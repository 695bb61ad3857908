// Options of every adapter algorithm, with chained setters in the libtorch style:
//   lycoris::LoKrOptions().rank(8).factor(-1).tucker(true)
// One struct for all algorithms (each reads the fields it knows), so presets and per-module
// overrides can be applied uniformly; the per-algorithm builders below only select the algorithm.
#pragma once
#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace lycoris {

struct AdapterOptions {
  TORCH_ARG(std::string, algo) = "lora";  // registry name: lora, loha, lokr, full, ia3, dylora, glora, diag-oft, boft, norm, glokr
  TORCH_ARG(int64_t, rank) = 4;           // of a single adapter; a network's ranks are its linear_dim / conv_dim
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

// Typed builders: each selects its algorithm, e.g. LoKrOptions().factor(4) is a LoKr (the setters return
// AdapterOptions&, so chains mix freely: LoKrOptions().rank(8).tucker(true)).
#define LYCORIS_TYPED_OPTIONS(Type, name) \
  struct Type : AdapterOptions {          \
    Type() { algo(name); }                \
  };
LYCORIS_TYPED_OPTIONS(LoRAOptions, "lora")
LYCORIS_TYPED_OPTIONS(LoConOptions, "lora")
LYCORIS_TYPED_OPTIONS(LoHaOptions, "loha")
LYCORIS_TYPED_OPTIONS(LoKrOptions, "lokr")
LYCORIS_TYPED_OPTIONS(FullOptions, "full")
LYCORIS_TYPED_OPTIONS(IA3Options, "ia3")
LYCORIS_TYPED_OPTIONS(DyLoRAOptions, "dylora")
LYCORIS_TYPED_OPTIONS(GLoRAOptions, "glora")
LYCORIS_TYPED_OPTIONS(GLoKrOptions, "glokr")
LYCORIS_TYPED_OPTIONS(DiagOFTOptions, "diag-oft")
LYCORIS_TYPED_OPTIONS(BOFTOptions, "boft")
LYCORIS_TYPED_OPTIONS(NormOptions, "norm")
#undef LYCORIS_TYPED_OPTIONS

}  // namespace lycoris
