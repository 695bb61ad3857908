// An adapter applied in place to chunks of rows of a weight, ΔW never materialised: what an algorithm
// offers a merge that streams a checkpoint (AdapterImpl::row_kernel). A chunk of rows [r0, r1) of W, as
// a 2-D (O, I·k) view in the compute dtype (fp32, fp64 for fp64 weights), gets the step in place:
//   additive  W[r0:r1] += c · ΔW[r0:r1], from the factors of those rows (c = m·s, s the algorithm's scale)
//   DoRA, norm per output row:   V = W + ΔW, then V[r] ⊙= g'(r): the rows of a chunk are whole, one pass
//   DoRA, norm per input column: V = W + ΔW, then V[:, i] ⊙= g'(i): ‖V[:, i]‖ spans every row, so the
//           caller first runs a pass summing V² per column (set_column_sums), then `scale` applies g'
//           (g' = m·(g − 1) + 1, g = dora_scale / (‖V‖ + ε), functional::dora::factor; docs/format.md#dora)
//   scaling   W[r0:r1] ⊙= 1 + m·v along the rows or the input columns ((IA)^3, docs/format.md#ia3)
// Same math as apply_weight (only the order of the roundings inside one element, and of the sums of the
// norms, differs: a few ulps of the compute dtype); the caller rounds once to the output dtype.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>

namespace lycoris {

struct RowKernel {
  using RowsFn = std::function<void(const torch::Tensor& W_rows, int64_t r0, int64_t r1)>;

  int64_t block = 1;  // chunks hold a multiple of this many rows
  RowsFn add;         // the whole step; for a column-norm DoRA step only W ← V = W + ΔW
  // column-norm DoRA only: g' from Σ over all rows of V² per column ((I·k,) fp64), then W ⊙= g' per row range
  std::function<void(const torch::Tensor& column_sums)> set_column_sums;
  RowsFn scale;

  bool needs_columns() const { return static_cast<bool>(set_column_sums); }
  void apply(const torch::Tensor& W, int64_t r0, int64_t r1) const {
    add(W, r0, r1);
    if (scale) scale(W, r0, r1);
  }
};

}  // namespace lycoris
