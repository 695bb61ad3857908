#include "io/read_pool.hpp"

#include <fcntl.h>
#include <unistd.h>
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "io/atomic_file.hpp"  // detail::pread_full
#include "lycoris/error.hpp"

namespace lycoris::io {

PreadReader::PreadReader(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw IOError(path + ": cannot open: " + std::strerror(errno));
#ifdef POSIX_FADV_SEQUENTIAL
  posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
#endif
}

PreadReader::~PreadReader() {
  if (fd_ >= 0) ::close(fd_);
}

void PreadReader::read(uint64_t offset, void* dst, uint64_t size) {
  if (detail::pread_full(fd_, path_, dst, size, offset) < size)
    throw IOError(path_ + ": unexpected end of file (truncated while merging?)");
}

SlotPool::SlotPool(size_t count, uint64_t bytes) : free_(count), bufs_(count), bytes_(bytes) {
  for (size_t i = 0; i < count; ++i) free_.push(i);
}

int SlotPool::acquire() {
  size_t i = 0;
  if (!free_.pop(i)) return -1;
  if (!bufs_[i].defined()) bufs_[i] = torch::empty({static_cast<int64_t>(std::max<uint64_t>(bytes_, 1))}, torch::kUInt8);
  return static_cast<int>(i);
}

void SlotPool::release(int slot) {
  if (slot >= 0) free_.push(static_cast<size_t>(slot));
}

}  // namespace lycoris::io
