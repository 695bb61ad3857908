// Extract's budget mode per layer (docs/tools.md#budget): the ways a changed layer can be stored, each with its
// cost and the error it leaves, and the fit of the chosen one.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lycoris/tools/extract.hpp"

namespace lycoris::tools {

struct LayerCandidate {
  ExtractAlgo algo = ExtractAlgo::LoCon;
  bool diff = false;    // the whole difference (`diff`, and `diff_b` when the layer has a bias)
  int64_t rank = 0;
  uint64_t bytes = 0;   // tensor data in the output dtype
  uint64_t header = 0;  // header bytes of its entries, bounded (io::header_entry_bound)
  uint64_t params = 0;  // elements
  double error2 = 0;    // ‖D − ΔW‖² of the fit before rounding to the output dtype
};

// The tensors a fit of a layer of `shape` at `rank` writes, as empty meta tensors named by the algorithm's own
// writer (no data: what the budget counts before fitting). diff: `diff`, and `diff_b` of `bias_shape` if any.
NamedTensors candidate_layout(const LayerCandidate& c, const std::vector<int64_t>& shape,
                              const std::vector<int64_t>& bias_shape, const ExtractOptions& o);

// The candidates of the changed layer D (fp32; `module` its output name): LoCon at every rank 1 … min(O, I)
// (errors from the singular values: Σ_{i>r} σ_i²) and the whole difference; with algo Auto also LoHa at ranks
// 1, 2, 4, … 32 and LoKr at 1, 2, 4, … and its full-W2 form, each fitted (`residual2` gives ‖D − ΔW(fit)‖²).
// `max_offset`: the budget, which bounds every data offset of the file.
std::vector<LayerCandidate> layer_candidates(const torch::Tensor& D, const std::vector<int64_t>& bias_shape,
                                             const std::string& module, const ExtractOptions& o, uint64_t max_offset,
                                             const std::function<double(const LayerFit&)>& residual2);

// The fit of a candidate (its form and rank), in D's compute dtype; bias_delta goes to `diff_b` for diff.
LayerFit fit_candidate(const torch::Tensor& D, const torch::Tensor& bias_delta, const LayerCandidate& c,
                       const ExtractOptions& o);

}  // namespace lycoris::tools
