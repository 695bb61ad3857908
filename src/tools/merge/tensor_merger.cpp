#include "tools/merge/tensor_merger.hpp"

#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>

#include "exec/stopwatch.hpp"
#include "lycoris/adapter.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"

namespace lycoris::tools {

namespace {

std::string max_magnitude(const torch::Tensor& t) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "|x| = %.4g", t.abs().max().item<double>());
  return buf;
}

std::string finite_range(torch::ScalarType dtype) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "±%.6g", static_cast<double>(dtype == torch::kFloat16    ? 65504.0
                                                             : dtype == torch::kBFloat16 ? 3.3895313892515355e38
                                                                                         : 3.4028234663852886e38));
  return buf;
}

std::string wider_dtype_hint(torch::ScalarType dtype, bool weight_helps) {
  return std::string(dtype == torch::kFloat16 ? "Use --dtype fp32 or bf16" : "Use --dtype fp32") +
         (weight_helps ? ", or a smaller weight (-w)" : "");
}

// Why tensor `key` cannot be written: NaN/Inf in the base itself, the first step whose result has NaN/Inf,
// or — every step finite in the compute dtype — the first step after which the values no longer fit the
// output dtype (they would be rounded to Inf). Steps are re-run on a copy, so this costs only on failure.
std::string explain_nonfinite(const std::string& key, const torch::Tensor& base_value,
                              const std::vector<PlannedStep>& steps, torch::ScalarType out_dtype,
                              const std::vector<LoadedAdapter>& adapters, torch::Device device) {
  const auto compute = base_value.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto V = base_value.to(device, compute, false, true);
  if (!torch::isfinite(V).all().item<bool>()) return key + ": merged tensor has NaN/Inf values, from the base tensor itself";
  const PlannedStep* overflow = nullptr;
  for (const auto& s : steps) {
    const auto& st = s.step;
    auto rows = step_rows(V, st);  // the step's rows (a fused tensor's block) or V itself
    rows.copy_(st.bias ? st.adapter->apply_bias(rows, st.m) : st.adapter->apply_weight(rows, st.m));
    if (!torch::isfinite(V).all().item<bool>())
      return key + ": merged tensor has NaN/Inf values, from module " + s.module->name + " (" + s.module->algo +
             ") of " + adapters[s.adapter].path;
    if (!overflow && !functional::finite_in(V, out_dtype)) overflow = &s;
  }
  if (!overflow) overflow = &steps.back();
  char weight[32];
  std::snprintf(weight, sizeof weight, "%g", overflow->step.m);
  return key + ": merged values reach " + max_magnitude(V) + ", beyond the range of " +
         io::dtype_name(io::from_torch(out_dtype)) + " (" + finite_range(out_dtype) + ") from module " +
         overflow->module->name + " (" + overflow->module->algo + ") of " + adapters[overflow->adapter].path +
         " at weight " + weight + ": they would be written as Inf. " + wider_dtype_hint(out_dtype, true);
}

}  // namespace

TensorMerger::TensorMerger(const io::SafetensorsFile& base, const MergePlan& plan,
                           const std::vector<io::DType>& out_dtypes, const MergeOptions& options)
    : base_(base), plan_(plan), out_dtypes_(out_dtypes), options_(options) {}

torch::Tensor TensorMerger::operator()(size_t index, const torch::Tensor& data) {
  const auto& t = base_.tensors()[index];
  const exec::Stopwatch busy;
  torch::Tensor result = data;
  if (auto steps = plan_.steps.find(t.name); steps != plan_.steps.end())
    result = merged(index, data, steps->second);
  else if (out_dtypes_[index] != t.dtype)
    result = converted(index, data);
  seconds_ += busy.seconds();
  static const bool trace = std::getenv("LYCORIS_MERGE_TRACE") != nullptr;
  if (trace)
    std::fprintf(stderr, "%8.1f ms %s %s\n", busy.seconds() * 1e3, t.name.c_str(), c10::str(t.shape).c_str());
  return result;
}

torch::Tensor TensorMerger::merged(size_t index, const torch::Tensor& data, const std::vector<PlannedStep>& steps) {
  const auto& t = base_.tensors()[index];
  const io::DType out_dtype = out_dtypes_[index];
  // F8 bytes are decoded (exactly) by the file reader; everything else is the tensor we read
  torch::Tensor x = io::has_torch_dtype(t.dtype) ? data : base_.tensor(t.name);
  // same dtype: the result overwrites the read buffer (chunk by chunk), nothing else is allocated
  auto result = out_dtype == t.dtype ? x : torch::empty(t.shape, torch::TensorOptions().dtype(io::to_torch(out_dtype)));
  std::vector<MergeStep> ms;
  for (const auto& s : steps) ms.push_back(s.step);
  if (!merge_tensor(x, result, ms, options_.device))
    throw Error(explain_nonfinite(t.name, io::has_torch_dtype(t.dtype) ? base_.tensor(t.name) : x, steps,
                                  io::to_torch(out_dtype), plan_.adapters, options_.device));
  return result;
}

// A finite value the new dtype cannot hold would be written as Inf (the base's own NaN/Inf, if any, is
// copied as it is, like every untouched tensor).
torch::Tensor TensorMerger::converted(size_t index, const torch::Tensor& data) {
  const auto& t = base_.tensors()[index];
  const io::DType out_dtype = out_dtypes_[index];
  torch::Tensor x = io::has_torch_dtype(t.dtype) ? data : base_.tensor(t.name);
  auto result = x.to(io::to_torch(out_dtype)).contiguous();
  if (io::is_floating(out_dtype) && !torch::isfinite(result).all().item<bool>() &&
      torch::isfinite(x).all().item<bool>())
    throw Error(t.name + ": values up to " + max_magnitude(x.to(torch::kFloat64)) + " do not fit " +
                io::dtype_name(out_dtype) + " (" + finite_range(io::to_torch(out_dtype)) + "): --dtype " +
                dtype_label(options_.dtype) + " would write them as Inf. " +
                wider_dtype_hint(io::to_torch(out_dtype), false));
  return result;
}

}  // namespace lycoris::tools
