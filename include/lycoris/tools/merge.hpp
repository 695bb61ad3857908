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
// NaN/Inf check, one rounding to the output dtype; never the whole checkpoint, never an fp32 copy of a whole
// tensor for algorithms with a row kernel (AdapterImpl::row_kernel: LoRA/LoHa/LoKr/(IA)^3/DoRA; the others:
// one tensor's fp32 temporaries).
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
}  // namespace lycoris::tools
