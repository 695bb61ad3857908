// Reading tensors of a file into a fixed pool of buffers (the merge's buffer-pool path).
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "exec/bounded_queue.hpp"

namespace lycoris::io {

// A file read by pread (sequential access advised): ranges at any offset, from any thread.
class PreadReader {
 public:
  explicit PreadReader(const std::string& path);  // IOError when it cannot be opened
  ~PreadReader();
  PreadReader(const PreadReader&) = delete;
  PreadReader& operator=(const PreadReader&) = delete;
  // [offset, offset + size) into dst; IOError when the file ends first (truncated meanwhile) or fails.
  void read(uint64_t offset, void* dst, uint64_t size);

 private:
  std::string path_;
  int fd_ = -1;
};

// `count` read buffers of `bytes` each, allocated on first use and recycled by their consumer. Fixed
// buffers instead of a fresh tensor per item keep the peak memory known and avoid the page faults of fresh
// allocations (each slot is faulted in once).
class SlotPool {
 public:
  SlotPool(size_t count, uint64_t bytes);
  // A free slot (blocks while all are in use); -1 once aborted.
  int acquire();
  void release(int slot);
  void* data(int slot) { return bufs_[static_cast<size_t>(slot)].data_ptr(); }
  void abort() { free_.abort(); }

 private:
  exec::BoundedQueue<size_t> free_;
  std::vector<torch::Tensor> bufs_;
  uint64_t bytes_;
};

}  // namespace lycoris::io
