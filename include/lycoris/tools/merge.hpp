// Merging adapters into a base checkpoint (`lycoris merge`, TOOLS.md §1 and §5, issues 3 and 6).
//
// Streaming pipeline, three stages overlapped by two small bounded queues:
//   reader  (pread of one base tensor at a time, in file order)
//   compute (only for tensors an adapter touches: W' = … apply_weight(apply_weight(W, m1), m2) … in fp32,
//            NaN/Inf check, one cast to the output dtype)
//   writer  (SafetensorsWriter: streaming, atomic — the output appears only after the last byte)
// Untouched tensors go from reader to writer as raw bytes (converted only when the output dtype differs).
// Peak memory ≈ the adapters + the tensors in flight (bounded by max_bytes_in_flight, at least one tensor)
// + one tensor's fp32 temporaries; never the whole checkpoint.
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
  uint64_t max_bytes_in_flight = 256ull << 20;  // read-ahead budget of the pipeline
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

// The JSON recorded under the output metadata key "lycoris_merge" (exposed for tests).
std::string merge_record(const std::vector<MergeInput>& adapters, const std::optional<torch::ScalarType>& dtype,
                         const std::string& previous);

}  // namespace lycoris::tools
