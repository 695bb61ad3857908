// libFuzzer target: parse_header over arbitrary bytes. Must either return a header satisfying the
// format's invariants or throw lycoris::FormatError with a one-line message naming the file; anything
// else (another exception, a sanitizer report, a violated invariant) is a finding.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "lycoris/error.hpp"
#include "lycoris/io/header.hpp"

namespace {
void check(bool ok) {
  if (!ok) __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lycoris::io;
  try {
    Header h = parse_header(data, size, "fuzz.safetensors");
    check(h.data_start == 8 + h.header_size && h.data_start <= size && h.header_size <= kMaxHeaderSize);
    // Sorted by offset, the tensors tile the data buffer exactly.
    uint64_t pos = 0;
    for (const TensorInfo& t : h.tensors) {
      check(t.begin == pos && t.begin <= t.end);
      check(t.end - t.begin == t.numel() * item_size(t.dtype));
      for (int64_t d : t.shape) check(d >= 0);
      check(t.name != "__metadata__");
      pos = t.end;
    }
    check(pos == size - h.data_start);
  } catch (const lycoris::FormatError& e) {
    const char* msg = e.what();
    check(std::strncmp(msg, "fuzz.safetensors: header: ", 26) == 0 ||
          std::strncmp(msg, "fuzz.safetensors: tensor '", 26) == 0);
    check(std::strchr(msg, '\n') == nullptr);
  }
  return 0;
}
