// Options of every adapter algorithm, with chained setters in the libtorch style:
//   lycoris::LoKrOptions().rank(8).factor(-1).tucker(true)
// One struct for all algorithms (each reads the fields it knows), so presets and per-module
// overrides can be applied uniformly; the per-algorithm builders below only select the algorithm.
#pragma once
#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace lycoris {

// Every module option after algo, rank and alpha, in one list: the struct's fields, the preset and override
// keys with their aliases, the saved metadata and the "does not apply" warnings are generated from it.
//   X(type, field, default, key, aliases, scope)
// field: the setter and the name in messages; key: the reference's spelling in presets, per-module overrides and
// the network metadata (docs/training.md#overrides); aliases: other accepted keys, space-separated; scope: Every
// (read by every module) or Some (read by the algorithms whose registry entry lists it; setting it for another
// algorithm warns, docs/training.md#option-checks).
#define LYCORIS_MODULE_OPTIONS(X)                                                                                 \
  X(bool, tucker, false, "use_tucker", "tucker use_cp", Some)   /* Tucker core (convs with a kernel > 1 only) */  \
  X(bool, use_scalar, false, "use_scalar", "", Some)            /* trainable scalar multiplying ΔW, folded on save */ \
  X(bool, dora, false, "weight_decompose", "dora dora_wd", Some) /* DoRA */                                        \
  X(bool, wd_on_out, true, "wd_on_out", "wd_on_output", Every)  /* DoRA norm per output row (or input column) */   \
  X(bool, rs_lora, false, "rs_lora", "", Some)                  /* scale alpha/sqrt(r) */                          \
  X(double, dropout, 0.0, "dropout", "", Some)                  /* dropout on the input */                         \
  X(double, rank_dropout, 0.0, "rank_dropout", "", Some)        /* dropout on the rank / output rows */            \
  X(bool, rank_dropout_scale, false, "rank_dropout_scale", "", Some)                                               \
  X(double, module_dropout, 0.0, "module_dropout", "", Every)   /* probability to skip the adapter for a step */   \
  X(int64_t, factor, -1, "factor", "", Some)                    /* LoKr/GLoKr factorization factor */              \
  X(bool, decompose_both, false, "decompose_both", "", Some)                                                       \
  X(bool, full_matrix, false, "full_matrix", "", Some)                                                             \
  X(bool, unbalanced_factorization, false, "unbalanced_factorization", "", Some)                                   \
  X(int64_t, block_size, 4, "block_size", "", Some)             /* DyLoRA rank block */                            \
  X(double, constraint, 0.0, "constraint", "constrain", Some)   /* Diag-OFT/BOFT Cayley constraint (0 = none) */   \
  X(bool, rescaled, false, "rescaled", "", Some)                /* Diag-OFT/BOFT per-row rescale */                \
  X(bool, train_on_input, false, "train_on_input", "", Some)    /* (IA)^3 scales input columns */                  \
  X(bool, bypass_mode, false, "bypass_mode", "", Every)         /* y = W0·x + ΔW·x without materialising ΔW */

enum class OptionScope { Every, Some };

struct AdapterOptions {
  TORCH_ARG(std::string, algo) = "lora";  // registry name: lora, loha, lokr, full, ia3, dylora, glora, diag-oft, boft, norm, glokr
  TORCH_ARG(int64_t, rank) = 4;           // of a single adapter; a network's ranks are its linear_dim / conv_dim
  TORCH_ARG(double, alpha) = 1.0;         // 0 → alpha = rank (scale 1)
#define LYCORIS_OPTION_FIELD(type, field, init, key, aliases, scope) TORCH_ARG(type, field) = init;
  LYCORIS_MODULE_OPTIONS(LYCORIS_OPTION_FIELD)
#undef LYCORIS_OPTION_FIELD
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
