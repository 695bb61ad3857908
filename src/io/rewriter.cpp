// SafetensorsRewriter (see include/lycoris/io/rewriter.hpp): a ring of memory between an O_DIRECT reader
// and an O_DIRECT writer, the caller editing tensors in place in between.
#include "lycoris/io/rewriter.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "atomic_file.hpp"
#include "lycoris/error.hpp"

namespace lycoris::io {

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kAlign = detail::AtomicFile::kAlign;
constexpr uint64_t kReadChunk = 16ull << 20;  // one read; the disk sees few, large requests
constexpr uint64_t kWriteMin = 8ull << 20;    // the writer waits for this much before writing (or the end)
constexpr uint64_t kWriteMax = 32ull << 20;   // and writes at most this much at once

uint64_t align_down(uint64_t x) { return x / kAlign * kAlign; }
uint64_t align_up(uint64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// `size` bytes of memory mapped twice back to back: [p, p + size) and [p + size, p + 2·size) are the same
// pages, so any range of at most `size` bytes starting inside the first copy is contiguous.
class DoubleMappedRing {
 public:
  explicit DoubleMappedRing(uint64_t size) : size_(size) {
    const int fd = memfd_create("lycoris-rewrite", MFD_CLOEXEC);
    if (fd < 0) throw IOError(std::string("cannot create the merge window (memfd_create): ") + std::strerror(errno));
    void* base = MAP_FAILED;
    if (ftruncate(fd, static_cast<off_t>(size)) == 0)
      base = mmap(nullptr, 2 * size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    bool ok = base != MAP_FAILED;
    for (int copy = 0; ok && copy < 2; ++copy)
      ok = mmap(static_cast<uint8_t*>(base) + copy * size, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
                0) != MAP_FAILED;
    const int err = errno;
    ::close(fd);  // the mappings keep the memory
    if (!ok) {
      if (base != MAP_FAILED) munmap(base, 2 * size);
      throw IOError(std::string("cannot map the merge window (") + std::to_string(size >> 20) +
                    " MiB): " + std::strerror(err));
    }
    base_ = static_cast<uint8_t*>(base);
  }
  ~DoubleMappedRing() { munmap(base_, 2 * size_); }
  uint8_t* at(uint64_t position) const { return base_ + position % size_; }
  uint64_t size() const { return size_; }

 private:
  uint8_t* base_ = nullptr;
  uint64_t size_;
};

}  // namespace

struct SafetensorsRewriter::State {
  std::string input_path;
  std::vector<TensorInfo> tensors;
  int in_fd = -1;
  detail::AtomicFile out;
  bool out_direct = false;

  std::string header;           // the output's first data_start bytes (length prefix, JSON, padding)
  uint64_t data_start = 0;      // output offset of the data buffer
  uint64_t shift = 0;           // output offset − input offset (a multiple of kAlign)
  uint64_t first = 0;           // align_down(data_start): the ring holds output offsets ≥ first
  uint64_t total = 0;           // output size
  std::unique_ptr<DoubleMappedRing> ring;

  // Progress, as output offsets. Bytes in [first, read_to) are in the ring; [data_start, released_to)
  // are final; [first, written_to) are on disk (their ring space is free again).
  std::mutex mu;
  std::condition_variable changed;
  uint64_t read_to = 0, released_to = 0, written_to = 0;
  size_t next = 0;  // next tensor to acquire
  bool acquired = false, all_released = false, aborted = false;
  std::exception_ptr error;
  std::atomic<int64_t> read_ns{0}, write_ns{0};
  std::thread reader, writer;

  State(std::string input, std::vector<TensorInfo> infos, std::string output)
      : input_path(std::move(input)), tensors(std::move(infos)), out(std::move(output)) {}
  ~State() {
    stop();
    if (in_fd >= 0) ::close(in_fd);
  }

  uint8_t* at(uint64_t offset) const { return ring->at(offset - first); }

  void fail(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(mu);
    if (!error) error = e;
    aborted = true;
    changed.notify_all();
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu);
      aborted = true;
      changed.notify_all();
    }
    if (reader.joinable()) reader.join();
    if (writer.joinable()) writer.join();
  }
  void rethrow_locked() {
    if (error) std::rethrow_exception(error);
    if (aborted) throw Error(out.path() + ": SafetensorsRewriter: used after a failure");
  }

  void read_loop() {
    try {
      for (uint64_t r = first; r < total;) {
        const uint64_t n = std::min(kReadChunk, align_up(total) - r);
        {
          std::unique_lock<std::mutex> lock(mu);
          changed.wait(lock, [&] { return aborted || r + n - written_to <= ring->size(); });
          if (aborted) return;
        }
        const auto t0 = Clock::now();
        const uint64_t want = std::min(n, total - r);
        if (detail::pread_full(in_fd, input_path, at(r), n, r - shift) < want)
          throw IOError(input_path + ": unexpected end of file (truncated while merging?)");
        // the block the header ends in: its head is ours, not the input's
        if (r == first) std::memcpy(at(first), header.data() + first, data_start - first);
        read_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
        std::lock_guard<std::mutex> lock(mu);
        read_to = r + want;
        r += n;
        changed.notify_all();
      }
    } catch (...) {
      fail(std::current_exception());
    }
  }

  void write_range(const uint8_t* p, uint64_t n, uint64_t offset) {
    if (int e = detail::pwrite_all(out.fd(), p, n, offset)) {
      errno = e;
      out.fail("write failed");
    }
  }

  void write_loop() {
    try {
      // the header's whole blocks, from an aligned copy (O_DIRECT needs aligned memory)
      if (first > 0) {
        const auto t0 = Clock::now();
        void* buf = nullptr;
        if (posix_memalign(&buf, kAlign, first) != 0) throw std::bad_alloc();
        std::unique_ptr<void, void (*)(void*)> owned(buf, std::free);
        std::memcpy(buf, header.data(), first);
        write_range(static_cast<uint8_t*>(buf), first, 0);
        write_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
      }
      for (;;) {
        uint64_t from = 0, to = 0;
        {
          std::unique_lock<std::mutex> lock(mu);
          const uint64_t end = out_direct ? align_up(total) : total;
          auto limit = [&] {
            // released bytes are read too; the last block is written whole (then cut) once all is final
            // and read (a file without data: the header's last block, patched by the reader)
            if (all_released && read_to >= total) return end;
            return align_down(std::min(released_to, read_to));
          };
          auto finished = [&] { return all_released && read_to >= total && written_to >= end; };
          changed.wait(lock, [&] {
            return aborted || finished() ||
                   (written_to < limit() && (all_released || limit() - written_to >= kWriteMin));
          });
          if (aborted || finished()) return;
          from = written_to;
          to = std::min(limit(), from + kWriteMax);
        }
        const auto t0 = Clock::now();
        write_range(at(from), to - from, from);
        write_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
        std::lock_guard<std::mutex> lock(mu);
        written_to = to;
        changed.notify_all();
      }
    } catch (...) {
      fail(std::current_exception());
    }
  }
};

bool SafetensorsRewriter::supported(const Header& input) {
#if defined(__linux__)
  return input.data_start % 8 == 0;
#else
  (void)input;
  return false;
#endif
}

SafetensorsRewriter::SafetensorsRewriter(const std::string& input, const Header& input_header, std::string output,
                                         std::map<std::string, std::string> metadata, Options options) {
  if (!supported(input_header)) throw Error(input + ": SafetensorsRewriter: unsupported input (data not 8-byte aligned)");
  std::vector<TensorDecl> decls;
  uint64_t data = 0, largest = 0;
  for (const auto& t : input_header.tensors) {
    decls.push_back({t.name, t.dtype, t.shape});
    data = std::max(data, t.end);
    largest = std::max(largest, t.nbytes());
  }
  // The output header, padded so that its data starts where the input's does within a block.
  std::vector<uint64_t> sizes;
  std::string json = detail::header_json(output, decls, metadata, sizes);
  const uint64_t want = input_header.data_start % kAlign;
  json.append((want + kAlign - (8 + json.size()) % kAlign) % kAlign, ' ');
  if (json.size() > kMaxHeaderSize)
    throw FormatError(output + ": header: too large (" + std::to_string(json.size()) + " bytes)");

  state_ = std::make_unique<State>(input, input_header.tensors, output);
  State& s = *state_;
  s.header = detail::header_bytes(json);
  s.data_start = s.header.size();
  s.shift = s.data_start - input_header.data_start;  // ≡ 0 mod kAlign; wraps harmlessly if negative
  s.first = align_down(s.data_start);
  s.total = s.data_start + data;
  // Room for the largest tensor, a read chunk beyond it, and a block on each side.
  const uint64_t need = align_up(largest) + kReadChunk + kWriteMin + 4 * kAlign;
  const uint64_t window = (std::max(options.window_bytes, need) + (2ull << 20) - 1) / (2ull << 20) * (2ull << 20);
  s.ring = std::make_unique<DoubleMappedRing>(window);

  s.in_fd = detail::open_input(input, options.direct_read && !std::getenv("LYCORIS_NO_DIRECT_IO") ? O_DIRECT : 0);
  s.out.reserve(s.total);
  s.out_direct = s.out.try_direct();
  s.read_to = s.first;
  s.released_to = s.data_start;
  s.written_to = s.first;
  s.reader = std::thread([&s] { s.read_loop(); });
  s.writer = std::thread([&s] { s.write_loop(); });
}

SafetensorsRewriter::~SafetensorsRewriter() = default;

uint8_t* SafetensorsRewriter::acquire(size_t index) {
  State& s = *state_;
  std::unique_lock<std::mutex> lock(s.mu);
  if (s.acquired || index != s.next || index >= s.tensors.size())
    throw Error(s.out.path() + ": SafetensorsRewriter: tensor " + std::to_string(index) +
                " acquired out of order (next: " + std::to_string(s.next) + ")");
  const uint64_t end = s.data_start + s.tensors[index].end;
  s.changed.wait(lock, [&] { return s.aborted || s.read_to >= end; });
  s.rethrow_locked();
  s.acquired = true;
  return s.at(s.data_start + s.tensors[index].begin);
}

void SafetensorsRewriter::release(size_t index) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.acquired || index != s.next)
    throw Error(s.out.path() + ": SafetensorsRewriter: tensor " + std::to_string(index) + " released but not acquired");
  s.rethrow_locked();
  s.acquired = false;
  s.released_to = s.data_start + s.tensors[index].end;
  if (++s.next == s.tensors.size()) s.all_released = true;
  s.changed.notify_all();
}

void SafetensorsRewriter::commit() {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.next != s.tensors.size())
      throw KeyError(s.out.path() + ": only " + std::to_string(s.next) + " of " + std::to_string(s.tensors.size()) +
                     " tensors were released");
    s.all_released = true;  // (no tensors at all)
    s.changed.notify_all();
  }
  s.reader.join();
  s.writer.join();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.rethrow_locked();
    if (s.written_to < s.total) throw Error(s.out.path() + ": SafetensorsRewriter: internal error: output incomplete");
  }
  s.out.commit(s.total);
}

double SafetensorsRewriter::read_seconds() const { return static_cast<double>(state_->read_ns.load()) * 1e-9; }
double SafetensorsRewriter::write_seconds() const { return static_cast<double>(state_->write_ns.load()) * 1e-9; }

}  // namespace lycoris::io
