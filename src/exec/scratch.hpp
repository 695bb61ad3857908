// Per-thread scratch buffers for chunked loops (the merge's chunks of rows and the kernels run on them).
#pragma once
#include <torch/types.h>

#include <algorithm>
#include <cstdint>

namespace lycoris::exec {

// Elements of one chunk of rows: ≈ 256 KB of fp32, so that a chunk and a kernel's products stay in cache.
constexpr int64_t kChunkElements = 1 << 16;

// A (rows, cols) view of `buffer` (a thread_local of the caller: no allocation, no fresh pages per chunk),
// reallocated when too small or of another dtype (to at least a chunk).
inline torch::Tensor scratch(torch::Tensor& buffer, int64_t rows, int64_t cols, const torch::TensorOptions& opts) {
  const int64_t n = rows * cols;
  if (!buffer.defined() || buffer.dtype() != opts.dtype() || buffer.numel() < n)
    buffer = torch::empty({std::max(n, kChunkElements)}, opts);
  return buffer.narrow(0, 0, n).view({rows, cols});
}

}  // namespace lycoris::exec
