// Small helpers shared by every algorithm's functional code (one home each).
#pragma once
#include <torch/types.h>

#include <string>

#include "lycoris/adapter.hpp"

namespace lycoris::functional {

// The single value of a 0-dim or shape-(1,) numeric tensor (any dtype: fp16/bf16/fp32/int64 …), read
// at the full precision of its stored dtype (FORMAT.md §4.1). ShapeError naming `module.key` otherwise.
double scalar_value(const torch::Tensor& t, const std::string& module, const std::string& key);
// The tensor stored under `key`, or KeyError "<module>: missing key '<key>' (has: …)".
const torch::Tensor& require(const TensorMap& tensors, const std::string& key, const std::string& module);
// The tensor stored under `key`, or an undefined tensor.
torch::Tensor optional(const TensorMap& tensors, const std::string& key);
// ShapeError "<module>.<key>: expected shape [..], got [..] (<why>)" unless t has exactly `expected`.
void expect_shape(const torch::Tensor& t, torch::IntArrayRef expected, const std::string& module,
                  const std::string& key, const std::string& why = "");
// T reshaped to 2-D keeping the first axis: (T.size(0), numel / T.size(0)).
torch::Tensor flat(const torch::Tensor& t);
// The dtype ΔW math runs in: fp64 for fp64 inputs, fp32 otherwise.
torch::ScalarType compute_dtype(const torch::Tensor& like);
// t converted to the compute dtype of `like` (no copy when it already is).
torch::Tensor to_compute(const torch::Tensor& t, const torch::Tensor& like);
// "[3, 4, 1, 1]"
std::string shape_str(torch::IntArrayRef shape);

}  // namespace lycoris::functional
