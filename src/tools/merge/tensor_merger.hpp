// The per-tensor callback of a merge, the same for both I/O paths: a base tensor as read → what to write.
#pragma once
#include <torch/types.h>

#include <cstddef>
#include <vector>

#include "lycoris/io/safetensors.hpp"
#include "lycoris/tools/merge.hpp"
#include "tools/merge/plan.hpp"

namespace lycoris::tools {

class TensorMerger {
 public:
  // `out_dtypes`: the output dtype of every base tensor (file order).
  TensorMerger(const io::SafetensorsFile& base, const MergePlan& plan, const std::vector<io::DType>& out_dtypes,
               const MergeOptions& options);

  // Base tensor `index` read as `data` (raw bytes as uint8 for dtypes torch lacks): the tensor to write —
  // `data` itself when nothing changes it or when it was merged in place (same dtype), else a new tensor.
  // Error naming the culprit (base tensor, module and adapter, or --dtype) when the result would hold
  // NaN/Inf.
  torch::Tensor operator()(size_t index, const torch::Tensor& data);

  double seconds() const { return seconds_; }  // busy time so far

 private:
  torch::Tensor merged(size_t index, const torch::Tensor& data, const std::vector<PlannedStep>& steps);
  torch::Tensor converted(size_t index, const torch::Tensor& data);

  const io::SafetensorsFile& base_;
  const MergePlan& plan_;
  const std::vector<io::DType>& out_dtypes_;
  const MergeOptions& options_;
  double seconds_ = 0;
};

}  // namespace lycoris::tools
