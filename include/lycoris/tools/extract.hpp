// Extracting an adapter from a fine-tuned checkpoint (`lycoris extract`, docs/tools.md#extract, docs/tools.md#extract).
//
// For every layer "<path>.weight" present in both checkpoints with D = W_tuned − W_base ≠ 0 (reference
// test: not allclose(W_tuned, W_base, rtol 1e-5, atol 1e-8)) and M = flat(D) (O, I·k):
//   locon  exactly the reference tool: rank r by the mode's rule on the singular values of M, r ← max(1, r),
//          r ← min(O, I, r) (I = channels); r ≥ O/2 → the full difference (`diff`, `diff_b` when the layer
//          has a bias); else lora_up = U_r·diag(σ_r), lora_down = V_rᵀ, alpha = r as a (1,) tensor (s = 1);
//          the bias change of a low-rank layer is dropped (as the reference does; reported in the note).
//          --tucker: convs with a kernel ≠ 1 get the reference's second SVD (lora_mid); --use-sparse-bias:
//          the largest (1 − sparsity) fraction of the residual M − M̂ as COO (bias_indices/values/size).
//   loha   (beyond the reference) ΔW ≈ (w1a·w1b) ⊙ (w2a·w2b) with r from the same rule (no full fallback):
//          starts at (rank-r SVD) ⊙ (all-ones) — exactly the rank-r LoCon error — then alternating least
//          squares over the four factors (each step an exact ridge-regularised least-squares solve per
//          row/column); the best iterate is kept, so the error is never above the rank-r LoCon error.
//   lokr   (beyond the reference) ΔW ≈ W1 ⊗ W2 with (a, p) = factorization(O, factor), (c, q) =
//          factorization(I, factor): the nearest Kronecker product (Van Loan & Pitsianis: rearrange D so
//          that W1 ⊗ W2 becomes the rank-1 matrix vec(W1)·vec(W2)ᵀ, take its top singular triple), then W2
//          low-rank (w2_a·w2_b) when the rank asks for it (r < max(p, q)/2, the writer's rule), alternating
//          W1 = ⟨D, W2⟩/‖W2‖² and W2 = best rank r of ⟨D, W1⟩/‖W1‖² (each exact given the other).
// Modes (parameter p: --linear-* for Linear and 1×1 convs, --conv-* for larger kernels):
//   fixed r = p;  threshold #{σ_i > p};  ratio #{σ_i > p·σ_1} (0 ≤ p ≤ 1);
//   quantile #{i : σ_1 + … + σ_i < p·Σσ} (strict, 0 ≤ p ≤ 1);  full: every changed layer as diff/diff_b,
//   norm layers (1-D weights) as w_norm/b_norm (other modes skip norms, as the reference).
// For LoKr the rule applies to the singular values of the unconstrained W2 (p, q·k).
// Budget mode (--budget SIZE / --budget-params N, docs/tools.md#budget): instead of a rule per layer, the
// ranks (and with algo Auto the algorithm: LoCon, LoHa or LoKr per layer) are allocated across all layers
// together to minimise Σ w·‖D − ΔW‖² under the budget (tools/budget.hpp); the file, header included, never
// exceeds it. Layers that get nothing are left out of the file.
// Streaming: one layer pair per worker at a time from the memory-mapped inputs (pages released after each
// layer, D in a reused buffer); only the (small) factors are kept, full differences are recomputed while
// writing; the output is written atomically (SafetensorsWriter).
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lycoris/adapter.hpp"
#include "lycoris/functional/svd.hpp"
#include "lycoris/tools/rank_rule.hpp"

namespace lycoris::tools {

enum class ExtractAlgo { LoCon, LoHa, LoKr, Auto };  // Auto: budget mode only

// "locon"/"lora", "loha", "lokr", "auto" (OptionError otherwise). The rank modes are in rank_rule.hpp.
ExtractAlgo parse_extract_algo(const std::string& name);
const char* to_string(ExtractAlgo algo);

// The per-layer weight of the budget's objective Σ w·‖D − ΔW‖²: None w = 1 (the total squared error, the
// default), BaseNorm w = 1/‖W_base‖² (each layer's change relative to its weight).
enum class BudgetWeight { None, BaseNorm };
BudgetWeight parse_budget_weight(const std::string& name);  // "none", "base-norm"
const char* to_string(BudgetWeight weight);

struct ExtractOptions {
  ExtractAlgo algo = ExtractAlgo::LoCon;
  RankMode mode = RankMode::Fixed;
  double linear_param = 1;  // Linear and 1×1 convs
  double conv_param = 1;    // convs with a larger kernel
  bool sparse_bias = false;  // LoCon only
  double sparsity = 0.98;    // fraction of residual entries dropped
  bool tucker = false;       // LoCon convs with kernel ≠ 1: the reference's lora_mid decomposition
  // Module name prefix: "lycoris" (standalone names), "kohya" ("lora_te" for paths under text_model.,
  // "lora_unet" otherwise), or any other literal prefix.
  std::string prefix = "lycoris";
  torch::ScalarType dtype = torch::kFloat16;  // float outputs (the reference writes fp16)
  torch::Device device = torch::kCPU;         // where the SVDs run
  int threads = 0;  // layers in flight, each on one thread (intra-op and BLAS); 0 = torch's thread count
  functional::SVDMethod svd = functional::SVDMethod::Auto;  // top-r factors: auto picks randomized for small r
  functional::RandomizedOptions randomized;
  int64_t loha_iters = 10;   // ALS sweeps at most
  double loha_tol = 1e-2;    // …stopping when a sweep lowers ‖D − ΔW‖² by less than this fraction
  int64_t lokr_factor = -1;  // factorization bound for the Kronecker split (-1: most balanced)
  uint64_t budget_bytes = 0;   // > 0: budget mode, the output file at most this many bytes
  uint64_t budget_params = 0;  // > 0: budget mode counting the elements of the written tensors instead
  BudgetWeight budget_weight = BudgetWeight::None;
};

struct ExtractLayerReport {
  std::string module;  // output module name
  std::string key;     // base weight key
  std::vector<int64_t> shape;
  std::string algo;    // "locon", "loha", "lokr" ("locon" for diff)
  std::string form;    // "lora", "lora+tucker", "loha", "lokr", "lokr(full w2)", "diff", "norm", "skipped"
  int64_t rank = 0;    // 0 for full differences
  double delta_norm = 0;  // ‖D‖_F
  double rel_error = 0;   // ‖D − ΔW(file)‖_F / ‖D‖_F, ΔW rebuilt from the written (cast) tensors
  double seconds = 0;
  uint64_t bytes = 0;     // the layer's tensor data in the file
  uint64_t params = 0;    // …as elements
  std::string note;       // e.g. "bias change dropped", "rank clamped to 320"
};

struct ExtractReport {
  std::vector<ExtractLayerReport> layers;  // extracted and skipped layers (changed ones only), base order
  size_t unchanged = 0;                    // layers equal in both checkpoints
  size_t skipped = 0;                      // changed layers not extractable in this mode (norms)
  double total_rel_error = 0;  // sqrt(Σ‖D − ΔW‖²) / sqrt(Σ‖D‖²) over the extracted layers
  size_t tensors_written = 0;
  uint64_t bytes_written = 0;  // tensor data
  uint64_t file_bytes = 0;     // the whole file, header included
  double seconds = 0;
  // budget mode: the budget (bytes or parameters), what the allocation used of it (tensor bytes plus the header
  // bound, or elements), and the allocation's certificate (tools/budget.hpp) as relative errors over all
  // changed layers: no allocation costing ≤ certified_cost does better than certified_rel_error, none within
  // the budget better than lower_rel_error (predicted from the fp32 fits, before rounding to the dtype).
  uint64_t budget = 0, budget_used = 0, certified_cost = 0;
  double certified_rel_error = 0, lower_rel_error = 0;
  size_t dropped = 0;  // changed layers left out of the file (budget mode)
};

// The fitted tensors of one layer, in file order (suffix → tensor in the compute dtype, cast on write).
struct LayerFit {
  NamedTensors tensors;
  std::string form;
  int64_t rank = 0;
  std::string note;
};

// Layer-level fits of D (O, I, *K) at an explicit rank (ShapeError unless 1 ≤ rank ≤ the layer's limit:
// min(O, I) for LoCon/LoHa, min(p, q) of W2 for LoKr; LoKr stores W2 full when rank ≥ max(p, q)/2).
// No full-difference fallback here (that is the tool's rule, extract_layer).
LayerFit fit_locon(const torch::Tensor& D, int64_t rank, const ExtractOptions& options = {});
LayerFit fit_loha(const torch::Tensor& D, int64_t rank, const ExtractOptions& options = {});
LayerFit fit_lokr(const torch::Tensor& D, int64_t rank, const ExtractOptions& options = {});
// The tool's per-layer rule: rank by mode, clamp, full fallback (LoCon), then the algorithm's fit.
// `bias_delta` (may be undefined) is stored as diff_b when the layer falls back to the full difference.
LayerFit extract_layer(const torch::Tensor& D, const torch::Tensor& bias_delta, const ExtractOptions& options);
// ΔW a fit stands for (rebuilt through the algorithm registry, as any loader reads the file).
torch::Tensor fit_delta(const LayerFit& fit, torch::IntArrayRef weight_shape);

// The module name of a checkpoint layer path under options.prefix.
std::string extract_module_name(const std::string& prefix, const std::string& path);

// Extracts base → tuned into `output` (.safetensors, written atomically). Throws OptionError for bad
// options, IOError before any work when `output` cannot be written (io::check_output_path), KeyError when
// a weight/bias key is in one checkpoint only, ShapeError when shapes differ, FormatError/IOError for
// unreadable files, FormatError "<file>: tensor '<key>' has N NaN/Inf value(s)" for a changed layer's
// weight or bias with NaN/Inf in either checkpoint, Error when a written tensor overflows options.dtype;
// an error in the work on a layer (torch's included, as its message's first line) is one line
// "<tuned>: layer <key>: …". `output` is untouched on error. `on_layer` is called after each extracted
// layer.
ExtractReport extract(const std::string& base, const std::string& tuned, const std::string& output,
                      const ExtractOptions& options,
                      const std::function<void(const ExtractLayerReport&)>& on_layer = {});

}  // namespace lycoris::tools
