// safetensors header: validated plain structs, no torch (the fuzzer and `info` stay light).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "lycoris/io/dtype.hpp"

namespace lycoris::io {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // data_offsets, relative to the start of the data buffer
  uint64_t numel() const;
};

struct Header {
  std::vector<TensorInfo> tensors;  // sorted by data offset (file order)
  std::map<std::string, std::string> metadata;
  uint64_t header_size = 0;  // N (JSON bytes)
  uint64_t data_start = 0;   // 8 + N
};

// Validates everything before any tensor data is touched (see io/header.cpp for the list) and throws
// FormatError("<file>: <tensor>: <reason>") on the first problem. `bytes`/`size` = the whole file.
Header parse_header(const uint8_t* bytes, size_t size, const std::string& file);

}  // namespace lycoris::io
