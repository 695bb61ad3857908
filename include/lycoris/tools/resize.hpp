// Reducing the rank of LoRA / LoCon / DyLoRA modules (`lycoris resize`, docs/tools.md#resize).
//
// Per LoRA-format module (marker lora_up.weight; DyLoRA files are LoRA files): ΔW = s·flat(up)·D_eff with
// s = alpha / r and D_eff = flat(down), or for Tucker files D_eff[i, (c, κ)] = Σ_j mid[i, j, κ]·down[j, c].
// Its exact SVD comes from the factors (functional::svd_product: QR of both, SVD of the r×r core; ΔW is
// never formed; each factor scaled by a power of two to |x| ≤ 1 first, so that finite factors near the
// limit of their dtype cannot overflow), and the new rank N keeps the top N triples — the best rank-N approximation of ΔW
// (Eckart–Young). The scale s is kept (kohya's convention): alpha' = s·N, rounded to the stored dtype, and
// the factors absorb that rounding: up' = U·√(σ/|s'|)·sign(s'), down' = √(σ/|s'|)·Vᵀ with s' = alpha'/N.
// Convs are written in the plain LoCon layout (up (O, N, 1, …), down (N, I, *K)); dora_scale and sparse-bias
// keys are kept as they are (both are independent of the rank). Every other algorithm, and a LoRA module
// with an empty factor (rank 0: ΔW = 0), is copied unchanged (with a note in the report).
// Values: every input tensor must be finite and the factors floating point (FormatError naming the file,
// module and key); every output tensor must be finite in the dtype the file holds it in (Error naming the
// module and tensor when the resized factors or alpha overflow the input's dtypes).
// Budget (--budget SIZE, docs/tools.md#budget): the new ranks of all LoRA modules are allocated together to
// minimise Σ ‖ΔW − ΔW'‖² (the sum of the dropped σ²) with the output file, header included, at most the budget;
// a module that gets rank 0 is left out of the file.
// Rank rules: --dim N (N larger than the module's rank keeps its rank), --ratio X (σ_i > X·σ_1, X ∈ [0, 1]),
// --threshold X (σ_i > X ≥ 0); at least 1 is kept.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lycoris/adapter.hpp"
#include "lycoris/tools/rank_rule.hpp"

namespace lycoris::tools {

struct ResizeOptions {
  RankRule rule{RankMode::Fixed, 1};  // Fixed (--dim), Ratio or Threshold
  torch::Device device = torch::kCPU;
  int threads = 0;  // torch intra-op threads; 0 = leave as is
  uint64_t budget_bytes = 0;  // > 0: budget mode (the rule is ignored)
};

struct ResizeModuleReport {
  std::string module;
  std::string algo;         // detected algorithm
  int64_t old_rank = 0, new_rank = 0;
  double retained_energy = 1;  // Σ_{i≤N} σ_i² / Σ σ_i² of ΔW (1 for copied modules)
  double delta_energy = 0;     // Σ σ_i² = ‖ΔW‖² before resizing
  bool resized = false;        // false: copied unchanged
  bool dropped = false;        // budget mode: left out of the file
  uint64_t bytes = 0;          // the module's tensor data in the output
  std::string note;
};

struct ResizeReport {
  std::vector<ResizeModuleReport> modules;  // module-name order
  size_t resized = 0, copied = 0;
  double retained_energy = 1;  // over all resized modules: Σ kept σ² / Σ σ²
  size_t dropped = 0;
  uint64_t file_bytes = 0;     // the output file, header included
  double seconds = 0;
};

// One LoRA-format module (suffix → tensor) resized by `rule`; returns the module's new tensors in file
// order and fills `report`. KeyError/ShapeError naming `module` for a malformed module, FormatError for
// NaN/Inf values or non-float factors, Error when a resized tensor overflows its dtype.
NamedTensors resize_lora_module(const std::string& module, const TensorMap& tensors, const RankRule& rule,
                                ResizeModuleReport& report, const torch::Device& device = torch::kCPU);

// Resizes every LoRA-format module of `input` into `output` (atomic write; metadata kept).
// OptionError for a bad rule or thread count; IOError before any work when `output` cannot be written
// (io::check_output_path); the errors above with "<input>: " in front, and torch's errors as one line
// "<input>: <module>: <torch's message>"; output untouched on error.
ResizeReport resize(const std::string& input, const std::string& output, const ResizeOptions& options);

}  // namespace lycoris::tools
