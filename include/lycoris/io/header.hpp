// safetensors header: validated plain structs, no torch (the fuzzer and `info` stay light).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "lycoris/io/dtype.hpp"

namespace lycoris::io {

// Largest accepted JSON header (same limit as the reference Rust implementation).
constexpr uint64_t kMaxHeaderSize = 100'000'000;

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // data_offsets, relative to the start of the data buffer
  uint64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

struct Header {
  std::vector<TensorInfo> tensors;  // sorted by data offset (file order)
  std::map<std::string, std::string> metadata;
  uint64_t header_size = 0;  // N (JSON bytes)
  uint64_t data_start = 0;   // 8 + N
};

// Validates everything before any tensor data is touched and throws FormatError on the first problem:
// "<file>: header: <reason>" or "<file>: tensor '<name>': <reason>". Checks: 8-byte length present,
// ≤ kMaxHeaderSize and within the file; the header is one JSON object (nesting ≤ 3, no duplicate key at
// any level); `__metadata__` is an object of string → string (or null); every other entry has exactly
// dtype/shape/data_offsets, a known dtype, non-negative integer dims whose product (and byte size) fits
// in int64, data_offsets [begin, end] with end − begin = numel × item size; sorted by offset, the
// tensors tile the data buffer exactly (no gap, overlap, bytes past the end or trailing bytes). A file of
// another format (PyTorch ZIP archive, pickle, GGUF, HDF5, …) that fails as safetensors is named instead:
// "<file>: header: not a safetensors file: this is a ZIP archive (…)". Linear in the header's size.
// `bytes`/`size` = the whole file (only the first 8 + N bytes are read).
Header parse_header(const uint8_t* bytes, size_t size, const std::string& file);

// `text` made safe for a one-line error message: control / non-ASCII bytes as \xNN, at most `max` chars.
std::string printable(const std::string& text, size_t max = 200);

}  // namespace lycoris::io
