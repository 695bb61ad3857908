// The compute stage of a merge for one tensor: the adapter steps applied to a base tensor, in fp32 (fp64
// for fp64 tensors) with one rounding to the output dtype. Private to the library (tests include it).
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <vector>

namespace lycoris {
class AdapterImpl;
}

namespace lycoris::tools {

// One adapter module applied to a tensor at multiplier m (bias: apply_bias instead of apply_weight), to
// the rows [row_begin, row_end) of the tensor (row_end = -1: the whole tensor). A row block is the layer of
// a module that maps to part of a fused tensor (OpenCLIP's q/k/v in `attn.in_proj_weight` / `in_proj_bias`,
// naming::BaseLayer::part): the module sees exactly those rows, as it would see a separate q/k/v layer.
struct MergeStep {
  AdapterImpl* adapter;
  double m = 1.0;
  bool bias = false;
  int64_t row_begin = 0, row_end = -1;
  bool ranged() const { return row_end >= 0; }
};

// out ← round(… apply_weight(apply_weight(x, m1), m2) …) with the math in fp32 (fp64 for fp64 x) and one
// rounding to out's dtype. `out` has x's shape, any float dtype, and may be x itself. On CPU, when every
// step has a row kernel (AdapterImpl::row_kernel: LoRA / LoHa / LoKr without Tucker, with or without DoRA,
// and (IA)^3, in eval mode), ΔW is never materialised: chunks of rows are converted, go through every
// kernel in place (DoRA by column norms takes a first pass for the sums) and are rounded into `out` while
// in cache, in parallel on the worker pool. The result equals apply_weight's up to the order of fp32
// roundings inside an element. Otherwise x is copied to `device` in the compute dtype once and every step
// is applied to it in place (W += m·ΔW for additive adapters, W ← apply_weight(W, m) for the others; a step
// with a row range on the view of its rows — this path is taken whenever a step has one). Returns false
// when the result has NaN/Inf or values the output dtype cannot hold (`out` is written anyway).
// ShapeError when a step's row range lies outside x.
bool merge_tensor(const torch::Tensor& x, const torch::Tensor& out, const std::vector<MergeStep>& steps,
                  torch::Device device = torch::kCPU);

// A step's rows of W: [row_begin, row_end), or W itself; ShapeError when the range does not lie in W.
torch::Tensor step_rows(const torch::Tensor& W, const MergeStep& step);

}  // namespace lycoris::tools
