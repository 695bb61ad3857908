// Internal to io/: what SafetensorsFile, SafetensorsWriter and SafetensorsRewriter share — the header JSON of
// a list of declarations, opening and reading inputs, and the temporary file that becomes the output only
// by an atomic rename.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "lycoris/io/safetensors.hpp"

namespace lycoris::io::detail {

std::string errno_text();

// IOError "<path>: cannot write here: <why>" when `path` exists and is not a regular file.
void refuse_non_regular_output(const std::string& path);

// The header JSON for `decls` (packed in order from offset 0) and `metadata`, without padding; the byte
// size of every tensor goes to `sizes`. Throws FormatError/ShapeError naming `path` and the tensor.
std::string header_json(const std::string& path, const std::vector<TensorDecl>& decls,
                        const std::map<std::string, std::string>& metadata, std::vector<uint64_t>& sizes);

// The 8-byte little-endian length prefix followed by the header.
std::string header_bytes(const std::string& json);

// Opens `path` for reading, `flags` added to O_RDONLY | O_CLOEXEC (O_DIRECT: retried without it if
// refused). Anything but a regular file is an IOError "<path>: is a FIFO, not a regular file" (likewise a
// directory, device, socket), never a wait for a FIFO's writer. `size`, if given: the file's size.
int open_input(const std::string& path, int flags, uint64_t* size = nullptr);

// pread of [offset, offset + n) of `fd` into `p`, restarting after short reads and EINTR; an O_DIRECT
// descriptor the filesystem refuses (EINVAL) goes on buffered. Stops early only at the end of the file:
// returns the bytes read. Throws IOError "<path>: read failed: <errno text>".
uint64_t pread_full(int fd, const std::string& path, void* p, uint64_t n, uint64_t offset);

// pwrite everything (restarting after short writes); on EINVAL from O_DIRECT the descriptor is switched
// to buffered mode and the write goes on. Returns 0 or errno.
int pwrite_all(int fd, const uint8_t* p, uint64_t n, uint64_t off);

// The data goes to an unnamed file in `path`'s directory (O_TMPFILE), which commit() links as
// `path.tmp-<pid>-<n>` and renames into place (after fsync; the directory is synced too, so the rename is
// durable). Where the filesystem has no O_TMPFILE (or LYCORIS_NO_TMPFILE is set) the file has that name
// from the start. Destroyed uncommitted, nothing is left; a named temporary is also removed by the handler
// of remove_temporaries_on_signals().
class AtomicFile {
 public:
  static constexpr uint64_t kAlign = 4096;  // block size O_DIRECT transfers are aligned to (≥ 512, = page)

  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  // Reserve `size` bytes (early ENOSPC, contiguous allocation); no-op for 0.
  void reserve(uint64_t size);
  // Switch the descriptor to O_DIRECT; false (and buffered) where the filesystem refuses it, or when
  // LYCORIS_NO_DIRECT_IO is set.
  bool try_direct();
  // Cut to `size` (after a zero-padded last O_DIRECT block), fsync, close, rename over path().
  void commit(uint64_t size);
  // Throws IOError "<path>: <what> (temporary file <tmp>): <errno text>".
  [[noreturn]] void fail(const std::string& what) const;

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
  bool unnamed_ = false;         // O_TMPFILE, not linked yet
  char* registered_ = nullptr;   // tmp_'s slot in the signal handler's list, while the name exists
};

// `bytes` as the whole content of `path`, through an AtomicFile: the old file (if any) or the new one, never a
// mix. IOError naming `path` on failure.
void write_atomically(const std::string& path, const std::string& bytes);

}  // namespace lycoris::io::detail
