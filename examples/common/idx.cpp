// IDX reader on zlib's gz* API (it reads gzip and plain files alike).
#include "idx.hpp"

#include <torch/torch.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "lycoris/error.hpp"

namespace lycoris::data {
namespace {

struct GzCloser {
  void operator()(gzFile_s* f) const {
    if (f) gzclose_r(f);
  }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

// Reads exactly n bytes or throws: a short read is truncation, a zlib error is corruption.
void read_exact(gzFile f, const std::string& path, void* out, size_t n, const char* what) {
  auto* p = static_cast<uint8_t*>(out);
  size_t done = 0;
  while (done < n) {
    // gzread takes an unsigned count: read in chunks of at most 1 GiB.
    const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - done, size_t(1) << 30));
    const int got = gzread(f, p + done, chunk);
    if (got < 0) {
      int code = 0;
      const char* msg = gzerror(f, &code);
      throw FormatError(path + ": corrupt data while reading " + what + " (" + (msg ? msg : "zlib error") + ")");
    }
    if (got == 0) {
      int code = 0;
      const char* msg = gzerror(f, &code);
      std::string detail = (code != Z_OK && msg && *msg) ? std::string(" (") + msg + ")" : "";
      throw FormatError(path + ": truncated: " + what + " needs " + std::to_string(n) + " bytes, only " +
                        std::to_string(done) + " present" + detail);
    }
    done += static_cast<size_t>(got);
  }
}

uint32_t big_endian_u32(const uint8_t* b) {
  return (uint32_t(b[0]) << 24) | (uint32_t(b[1]) << 16) | (uint32_t(b[2]) << 8) | uint32_t(b[3]);
}

struct TypeInfo {
  torch::ScalarType type;
  size_t size;
};

bool type_of(uint8_t code, TypeInfo& info) {
  switch (code) {
    case 0x08: info = {torch::kUInt8, 1}; return true;
    case 0x09: info = {torch::kInt8, 1}; return true;
    case 0x0B: info = {torch::kInt16, 2}; return true;
    case 0x0C: info = {torch::kInt32, 4}; return true;
    case 0x0D: info = {torch::kFloat32, 4}; return true;
    case 0x0E: info = {torch::kFloat64, 8}; return true;
    default: return false;
  }
}

bool host_is_little_endian() {
  const uint16_t one = 1;
  uint8_t first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

}  // namespace

torch::Tensor read_idx(const std::string& path) {
  errno = 0;
  GzFile f(gzopen(path.c_str(), "rb"));
  if (!f) {
    throw IOError(path + ": cannot open (" + (errno ? std::strerror(errno) : "out of memory") + ")");
  }
  gzbuffer(f.get(), 1 << 17);

  uint8_t magic[4];
  read_exact(f.get(), path, magic, 4, "the magic number");
  if (magic[0] != 0 || magic[1] != 0) {
    throw FormatError(path + ": not an IDX file (magic bytes " + std::to_string(magic[0]) + " " +
                      std::to_string(magic[1]) + ", expected 0 0)");
  }
  TypeInfo type{};
  if (!type_of(magic[2], type)) {
    throw FormatError(path + ": unknown IDX data type code " + std::to_string(magic[2]) +
                      " (known: 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E)");
  }
  const int ndim = magic[3];
  if (ndim < 1 || ndim > 8) {
    throw FormatError(path + ": " + std::to_string(ndim) + " dimensions (expected 1 to 8)");
  }
  std::vector<uint8_t> dims_raw(4 * static_cast<size_t>(ndim));
  read_exact(f.get(), path, dims_raw.data(), dims_raw.size(), "the dimension sizes");
  std::vector<int64_t> shape;
  // Guard the element count: no Fashion-MNIST-like file comes near 2^40 bytes.
  const uint64_t limit = uint64_t(1) << 40;
  uint64_t bytes = type.size;
  for (int i = 0; i < ndim; ++i) {
    const uint32_t d = big_endian_u32(&dims_raw[4 * i]);
    if (d == 0) throw FormatError(path + ": dimension " + std::to_string(i) + " is 0");
    bytes *= d;
    if (bytes > limit) throw FormatError(path + ": dimensions describe more than 2^40 bytes of data");
    shape.push_back(d);
  }

  auto out = torch::empty(shape, torch::TensorOptions().dtype(type.type));
  read_exact(f.get(), path, out.data_ptr(), bytes, "the data");
  uint8_t extra;
  const int more = gzread(f.get(), &extra, 1);
  if (more < 0) {
    int code = 0;
    const char* msg = gzerror(f.get(), &code);
    throw FormatError(path + ": corrupt data at the end (" + (msg ? msg : "zlib error") + ")");
  }
  if (more > 0) throw FormatError(path + ": trailing data after the " + std::to_string(bytes) + " data bytes");
  // gzclose_r reports a stream that ended early or failed its CRC check.
  const int closed = gzclose_r(f.release());
  if (closed != Z_OK) throw FormatError(path + ": corrupt gzip stream (zlib error " + std::to_string(closed) + ")");

  // IDX stores multi-byte values big-endian.
  if (type.size > 1 && host_is_little_endian()) {
    auto* p = static_cast<uint8_t*>(out.data_ptr());
    for (uint64_t i = 0; i < bytes; i += type.size) std::reverse(p + i, p + i + type.size);
  }
  return out;
}

LabeledImages read_idx_dataset(const std::string& dir, const std::string& split) {
  const std::string images_path = dir + "/" + split + "-images-idx3-ubyte.gz";
  const std::string labels_path = dir + "/" + split + "-labels-idx1-ubyte.gz";
  auto images = read_idx(images_path);
  auto labels = read_idx(labels_path);
  if (images.dim() != 3 || images.scalar_type() != torch::kUInt8) {
    throw FormatError(images_path + ": expected 3-D uint8 images, got " + std::to_string(images.dim()) +
                      "-D " + std::string(c10::toString(images.scalar_type())));
  }
  if (labels.dim() != 1 || labels.scalar_type() != torch::kUInt8) {
    throw FormatError(labels_path + ": expected 1-D uint8 labels, got " + std::to_string(labels.dim()) +
                      "-D " + std::string(c10::toString(labels.scalar_type())));
  }
  if (labels.size(0) != images.size(0)) {
    throw FormatError(labels_path + ": " + std::to_string(labels.size(0)) + " labels for " +
                      std::to_string(images.size(0)) + " images in " + images_path);
  }
  return {images.unsqueeze(1).to(torch::kFloat32).div_(255.0), labels.to(torch::kInt64)};
}

}  // namespace lycoris::data
