// Memory handed out already backed by pages: populated huge-page blocks and the arena adapters load into.
#pragma once
#include <torch/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace lycoris::exec {

// Anonymous memory of at least `bytes`, 2 MiB-aligned, in transparent huge pages where the system allows
// (madvise mode) and populated before it is returned. On a VM with shadow paging the first touch of each
// 4 KiB page in a process costs ~1.5–4 µs (0.2–0.5 s for 136 MB); huge pages populated up front cost
// ~10 ms for the same block. nullptr when mapping fails; release with unmap_populated(p, size).
void* map_populated(size_t bytes, size_t& mapped_size);
void unmap_populated(void* p, size_t mapped_size);

// While one is alive, functional::owned_float on this thread takes its results from one populated block of
// `bytes` (the tensors keep the block alive), so that loading an adapter touches fresh memory in one go.
// Results that do not fit get ordinary allocations.
class OwnedFloatArena {
 public:
  explicit OwnedFloatArena(size_t bytes);
  ~OwnedFloatArena();
  OwnedFloatArena(const OwnedFloatArena&) = delete;
  OwnedFloatArena& operator=(const OwnedFloatArena&) = delete;
  // Bytes owned_float takes for a tensor of `numel` elements (fp64: 8 bytes each, else 4; aligned).
  static size_t bytes_for(uint64_t numel, bool fp64);
  // An uninitialised CPU tensor of `sizes` and `dtype` (fp32 or fp64) from this thread's innermost arena,
  // or an undefined tensor when there is none or it has no room left.
  static torch::Tensor take(torch::IntArrayRef sizes, torch::ScalarType dtype);

 private:
  struct Block;
  std::shared_ptr<Block> block_;
  size_t used_ = 0;
  OwnedFloatArena* previous_;
};

}  // namespace lycoris::exec
