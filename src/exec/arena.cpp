#include "exec/arena.hpp"

#include <sys/mman.h>
#include <torch/torch.h>

#include <algorithm>

namespace lycoris::exec {

void* map_populated(size_t bytes, size_t& mapped_size) {
  constexpr size_t kHuge = size_t{2} << 20;
  mapped_size = (std::max<size_t>(bytes, 1) + kHuge - 1) / kHuge * kHuge;
  // over-map by one huge page and trim, so that the block starts on a 2 MiB boundary
  void* raw = mmap(nullptr, mapped_size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  auto* base = static_cast<uint8_t*>(raw);
  auto* p = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(base) + kHuge - 1) / kHuge * kHuge);
  if (p > base) munmap(base, static_cast<size_t>(p - base));
  if (p + mapped_size < base + mapped_size + kHuge) munmap(p + mapped_size, static_cast<size_t>(base + kHuge - p));
#ifdef MADV_HUGEPAGE
  madvise(p, mapped_size, MADV_HUGEPAGE);
#endif
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE (Linux 5.14)
  if (madvise(p, mapped_size, kPopulateWrite) != 0)
    for (size_t i = 0; i < mapped_size; i += 4096) p[i] = 0;  // older kernels: touch instead
  return p;
}

void unmap_populated(void* p, size_t mapped_size) { munmap(p, mapped_size); }

namespace {
thread_local OwnedFloatArena* current_arena = nullptr;
constexpr size_t kArenaAlign = 64;
}  // namespace

struct OwnedFloatArena::Block {
  void* data = nullptr;
  size_t size = 0, capacity = 0;
  ~Block() {
    if (data) unmap_populated(data, size);
  }
};

OwnedFloatArena::OwnedFloatArena(size_t bytes) : block_(std::make_shared<Block>()), previous_(current_arena) {
  if (bytes > 0) block_->data = map_populated(bytes, block_->size);
  block_->capacity = block_->data ? bytes : 0;
  current_arena = this;
}

OwnedFloatArena::~OwnedFloatArena() { current_arena = previous_; }

size_t OwnedFloatArena::bytes_for(uint64_t numel, bool fp64) {
  return (numel * (fp64 ? 8 : 4) + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
}

torch::Tensor OwnedFloatArena::take(torch::IntArrayRef sizes, torch::ScalarType dtype) {
  OwnedFloatArena* arena = current_arena;
  const size_t need = bytes_for(static_cast<uint64_t>(c10::multiply_integers(sizes)), dtype == torch::kFloat64);
  if (!arena || arena->used_ + need > arena->block_->capacity) return {};
  auto block = arena->block_;
  auto out = torch::from_blob(static_cast<uint8_t*>(block->data) + arena->used_, sizes,
                              [block](void*) mutable { block.reset(); }, torch::TensorOptions().dtype(dtype));
  arena->used_ += need;
  return out;
}

}  // namespace lycoris::exec
