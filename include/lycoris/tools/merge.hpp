// Merging adapters into a base checkpoint (`lycoris merge`, docs/tools.md#merge).
//
// Two streaming paths, both three stages on their own threads (read, compute, write):
// - Same dtypes in and out (the usual case): io::SafetensorsRewriter. The output keeps the input's byte
//   layout (its header padded so the data sits at the same offset modulo 4096), so the base is read with
//   O_DIRECT straight into a ring of memory, each touched tensor is merged in place there, and finished
//   blocks are written with O_DIRECT from the same memory: no CPU copy of the 1.6 GB on its way. Reading
//   starts before the adapters are loaded. Peak memory ≈ the adapters + the ring (max_bytes_in_flight,
//   at least the largest tensor + 24 MB) + a chunk's buffers per thread.
// - A dtype change (--dtype): pread of one base tensor at a time into a pool of read buffers (max(3,
//   max_bytes_in_flight / largest tensor) of the largest size), compute, SafetensorsWriter.
// Compute is only for tensors an adapter touches: W' = … apply_weight(apply_weight(W, m1), m2) … in fp32,
// NaN/Inf check, one rounding to the output dtype (merge_tensor); never the whole checkpoint, never an fp32
// copy of a whole tensor for LoRA/LoHa/LoKr/(IA)^3/DoRA (other algorithms: one tensor's fp32 temporaries).
// Either way the output appears (by rename) only when complete.
// LYCORIS_MERGE_TRACE=1 in the environment prints each tensor's compute time to stderr;
// LYCORIS_MERGE_NO_REWRITER=1 forces the buffer-pool path (for comparisons); LYCORIS_MERGE_TEST_DELAY_MS=N
// pauses N ms after each tensor (for tests that interrupt a merge).
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "lycoris/naming.hpp"

namespace lycoris {
class AdapterImpl;
}

namespace lycoris::tools {

struct MergeInput {
  std::string path;     // adapter file (.safetensors)
  double weight = 1.0;  // multiplier m for every module of this adapter
};

struct MergeProgress {
  size_t index = 0;  // tensors written so far (1-based after the write)
  size_t total = 0;
  const std::string* key = nullptr;  // the tensor just written
  bool modified = false;
  uint64_t bytes_done = 0, bytes_total = 0;  // base data bytes
  double seconds = 0;                         // since merge() started (adapter loading included)
};

struct MergeOptions {
  std::vector<MergeInput> adapters;  // applied in this order
  // Output dtype of floating-point tensors (others are copied as they are); nullopt = the base's dtype.
  std::optional<torch::ScalarType> dtype;
  torch::Device device = torch::kCPU;  // where ΔW is computed
  bool allow_unmatched = false;        // unmatched / wrongly shaped adapter modules → warnings
  // Layout of the base checkpoint's keys (naming dialects, naming.hpp); Auto detects it from the keys.
  naming::BaseFormat base_format = naming::BaseFormat::Auto;
  int threads = 0;                     // torch intra-op threads (at::set_num_threads); 0 = leave as is
  // Read-ahead budget of the pipeline: the rewriter's ring, or max(3, budget / largest tensor) read
  // buffers of the largest size.
  uint64_t max_bytes_in_flight = 64ull << 20;
  std::function<void(const std::string&)> on_warning;       // default: collected in the report only
  std::function<void(const MergeProgress&)> on_progress;    // called by the writing thread per tensor
};

struct MergeReport {
  size_t tensors = 0;                   // tensors written (= base tensors)
  size_t modified = 0;                  // tensors changed by at least one adapter
  std::vector<size_t> modules_applied;  // per adapter
  uint64_t bytes_read = 0, bytes_written = 0;
  double load_seconds = 0, total_seconds = 0;
  double read_seconds = 0, compute_seconds = 0, write_seconds = 0;  // busy time of each pipeline stage
  std::vector<std::string> warnings;
};

// Merges `options.adapters` into `base` and writes `output` (may equal `base`). Throws lycoris::Error
// (KeyError/ShapeError for adapters that do not fit, FormatError/IOError for files, Error naming the
// module for NaN/Inf) — in that case `output` is left untouched.
MergeReport merge(const std::string& base, const std::string& output, const MergeOptions& options);

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

// The compute stage of merge for one tensor: out ← round(… apply_weight(apply_weight(x, m1), m2) …) with
// the math in fp32 (fp64 for fp64 x) and one rounding to out's dtype. `out` has x's shape, any float
// dtype, and may be x itself. On CPU, when every step is LoRA / LoHa / LoKr (eval, no Tucker; with or
// without DoRA) or (IA)^3, ΔW is never materialised: chunks of rows are converted, get m·ΔW added in place
// (addmm / addcmul from the factors; DoRA rescales by row norms in the same pass or by column norms in a
// second one) and are rounded into `out` while in cache, in parallel over our own worker threads. The
// result equals apply_weight's up to the order of fp32 roundings inside an element. Otherwise x is copied
// to `device` in fp32 once and every step is applied to it in place (W += m·ΔW for additive low-rank
// modules, W ← apply_weight(W, m) for the others; a step with a row range on the view of its rows — this
// path is taken whenever a step has one). Returns false when the result has NaN/Inf (`out` is written
// anyway). ShapeError when a step's row range lies outside x.
bool merge_tensor(const torch::Tensor& x, const torch::Tensor& out, const std::vector<MergeStep>& steps,
                  torch::Device device = torch::kCPU);

// The JSON recorded under the output metadata key "lycoris_merge" (exposed for tests).
std::string merge_record(const std::vector<MergeInput>& adapters, const std::optional<torch::ScalarType>& dtype,
                         const std::string& previous);

}  // namespace lycoris::tools
