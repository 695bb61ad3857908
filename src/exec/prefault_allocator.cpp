#include "exec/prefault_allocator.hpp"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstring>
#include <mutex>
#include <unordered_map>

#include "exec/arena.hpp"

namespace lycoris::exec {

namespace {

constexpr size_t kHuge = size_t{2} << 20;
constexpr size_t kCacheBytes = 128ull << 20;  // freed blocks kept for reuse (same size), at most this much

class PrefaultAllocator final : public c10::Allocator {
 public:
  PrefaultAllocator(c10::Allocator* fallback, size_t min_bytes) : fallback_(fallback), min_bytes_(min_bytes) {}

  c10::DataPtr allocate(size_t n) const override {
    if (n >= min_bytes_) {
      const size_t size = (n + kHuge - 1) / kHuge * kHuge;  // the size map_populated maps
      void* p = take_cached(size);
      size_t mapped = size;
      if (!p) p = map_populated(size, mapped);
      if (p) return {p, new Block{p, mapped, this}, &release, c10::Device(c10::DeviceType::CPU)};
    }
    return fallback_->allocate(n);
  }
  // torch ≥ 2.3 declares this pure virtual (no `override`: 1.13 does not have it)
  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }

 private:
  struct Block {
    void* p;
    size_t size;
    const PrefaultAllocator* owner;
  };
  void* take_cached(size_t size) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cache_.find(size);
    if (it == cache_.end()) return nullptr;
    void* p = it->second;
    cache_.erase(it);
    cached_ -= size;
    return p;
  }
  // A freed block is kept for the next allocation of its size (loops allocate the same shapes again:
  // no new mapping, no new pages), or unmapped once the cache is full.
  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    {
      std::lock_guard<std::mutex> lock(b->owner->mu_);
      if (b->owner->cached_ + b->size <= kCacheBytes) {
        b->owner->cache_.emplace(b->size, b->p);
        b->owner->cached_ += b->size;
        delete b;
        return;
      }
    }
    unmap_populated(b->p, b->size);
    delete b;
  }
  c10::Allocator* fallback_;
  size_t min_bytes_;
  mutable std::mutex mu_;
  mutable std::unordered_multimap<size_t, void*> cache_;
  mutable size_t cached_ = 0;
};

}  // namespace

void use_prefault_allocator(size_t min_bytes) {
  static std::once_flag once;
  std::call_once(once, [&] {
    // lives for the process (never destroyed): tensors it allocated may be freed during exit
    static auto* allocator = new PrefaultAllocator(c10::GetCPUAllocator(), min_bytes);
    c10::SetCPUAllocator(allocator, /*priority=*/1);
  });
}

}  // namespace lycoris::exec
