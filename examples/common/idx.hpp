// IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.
// Layout: two zero bytes, a type code, the number of dimensions n, then n big-endian uint32 sizes,
// then the data in row-major order, multi-byte values big-endian.
#pragma once
#include <torch/types.h>

#include <string>

namespace lycoris::data {

// The whole file as a tensor of its stored type (0x08 → uint8, 0x09 → int8, 0x0B → int16, 0x0C → int32,
// 0x0D → float32, 0x0E → float64) and shape. gzip is detected by zlib, so plain files work too.
// Missing file → IOError; bad magic, unknown type, zero/absurd dimensions, truncated data, trailing data,
// a corrupt gzip stream → FormatError. Every message starts with the path.
torch::Tensor read_idx(const std::string& path);

// An image classification set: images (N, 1, H, W) float32 in [0, 1], labels (N,) int64.
struct LabeledImages {
  torch::Tensor images;
  torch::Tensor labels;
};

// "<dir>/<split>-images-idx3-ubyte.gz" + "<dir>/<split>-labels-idx1-ubyte.gz" (split "train" or "t10k"),
// checked to agree in count, labels within [0, 255] and images 3-D uint8.
LabeledImages read_idx_dataset(const std::string& dir, const std::string& split);

}  // namespace lycoris::data
