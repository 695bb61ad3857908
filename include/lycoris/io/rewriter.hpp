// SafetensorsRewriter: a safetensors file rewritten into a new one with the same tensors (names, dtypes,
// shapes, file order) and new metadata, the caller changing tensor bytes in place on the way — the
// streaming merge's zero-copy path (docs/tools.md#merge-pipeline).
//
// The output's header is padded with spaces so that its data starts at the same offset modulo 4096 as the
// input's: every byte then sits at the same place within its 4 KiB block in both files, and one window of
// memory serves both transfers. A reader thread fills the window straight from the input (O_DIRECT where
// the filesystem allows, in large aligned chunks), the caller takes the tensors in file order and may
// change their bytes until it releases them, and a writer thread writes every finished block straight from
// the window (O_DIRECT likewise). No byte is copied by the CPU on its way, unless a filesystem refuses
// O_DIRECT (then the reads and writes are plain buffered ones).
//
// The window is a ring mapped twice back to back, so a tensor that wraps around its end is still one
// contiguous range of memory; it holds `window_bytes` (at least the largest tensor plus two chunks).
// Peak memory ≈ window_bytes. Atomic like SafetensorsWriter: the output appears only at commit().
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "lycoris/io/header.hpp"

namespace lycoris::io {

class SafetensorsRewriter {
 public:
  struct Options {
    uint64_t window_bytes = 192ull << 20;
    bool direct_read = true;  // O_DIRECT reads (no CPU copy; ignores a warm page cache)
  };

  // Whether this input can be rewritten by this class on this system (a Linux memfd ring; the input's
  // data 8-byte aligned, as every safetensors writer produces).
  static bool supported(const Header& input);

  // Starts reading at once. `input_header` is `input`'s parsed header (parse_header).
  SafetensorsRewriter(const std::string& input, const Header& input_header, std::string output,
                      std::map<std::string, std::string> metadata, Options options);
  SafetensorsRewriter(const std::string& input, const Header& input_header, std::string output,
                      std::map<std::string, std::string> metadata)
      : SafetensorsRewriter(input, input_header, std::move(output), std::move(metadata), Options{}) {}
  // Without commit(): stops the threads, removes the temporary file.
  ~SafetensorsRewriter();
  SafetensorsRewriter(const SafetensorsRewriter&) = delete;
  SafetensorsRewriter& operator=(const SafetensorsRewriter&) = delete;

  // Tensor `index` (of input_header.tensors; taken in order, each once) once its bytes are in memory:
  // its nbytes() bytes, to be changed in place or not, until release(). Rethrows a reader/writer error.
  uint8_t* acquire(size_t index);
  // The bytes of the tensor last acquired are final (they will be written).
  void release(size_t index);
  // After every tensor is released: the last blocks, fsync, rename into place.
  void commit();

  // Busy seconds of the background reader (waiting for the disk included, waiting for room excluded)
  // and writer (likewise, waiting for released bytes excluded).
  double read_seconds() const;
  double write_seconds() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace lycoris::io
