// IDX reader: hand-written files (bytes spelled out here, gzip via zlib) and every failure mode.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <zlib.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "idx.hpp"
#include "lycoris/error.hpp"
#include "test_util.hpp"

namespace idx_test {

namespace {

using Bytes = std::vector<uint8_t>;
using lycoris::data::read_idx;

void write_gz(const std::string& path, const Bytes& b) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, b.data(), static_cast<unsigned>(b.size())), static_cast<int>(b.size()));
  ASSERT_EQ(gzclose(f), Z_OK);
}

void write_raw(const std::string& path, const Bytes& b) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

Bytes read_raw(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

// A 2×3 uint8 image: magic 00 00 08 02, dims 2 and 3 big-endian, six values.
const Bytes kImage = {0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 250, 251, 255};

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const lycoris::Error& e) {
    return e.what();
  }
  return "";
}

TEST(Idx, ReadsGzipUint8) {
  auto dir = lycoris::test::temp_dir("idx");
  write_gz(dir + "/a.gz", kImage);
  auto t = read_idx(dir + "/a.gz");
  EXPECT_EQ(t.scalar_type(), torch::kUInt8);
  EXPECT_EQ(t.sizes(), (std::vector<int64_t>{2, 3}));
  auto expected = torch::tensor({1, 2, 3, 250, 251, 255}, torch::kUInt8).reshape({2, 3});
  EXPECT_TRUE(torch::equal(t, expected));
}

TEST(Idx, ReadsPlainFileToo) {
  auto dir = lycoris::test::temp_dir("idx");
  write_raw(dir + "/a", kImage);
  EXPECT_TRUE(torch::equal(read_idx(dir + "/a"), read_idx(dir + "/a")));
  EXPECT_EQ(read_idx(dir + "/a")[1][2].item<int>(), 255);
}

TEST(Idx, BigEndianMultiByteTypes) {
  auto dir = lycoris::test::temp_dir("idx");
  // int32 (0x0C), 1-D of 2: 0x01020304 = 16909060 and 0xFFFFFFFE = -2.
  write_gz(dir + "/i.gz", {0, 0, 0x0C, 1, 0, 0, 0, 2, 1, 2, 3, 4, 0xFF, 0xFF, 0xFF, 0xFE});
  auto i = read_idx(dir + "/i.gz");
  EXPECT_EQ(i.scalar_type(), torch::kInt32);
  EXPECT_EQ(i[0].item<int32_t>(), 16909060);
  EXPECT_EQ(i[1].item<int32_t>(), -2);
  // float32 (0x0D): 0x3FC00000 = 1.5; float64 (0x0E): 0xC004000000000000 = -2.5; int16 (0x0B): 0x0102 = 258.
  write_gz(dir + "/f.gz", {0, 0, 0x0D, 1, 0, 0, 0, 1, 0x3F, 0xC0, 0, 0});
  EXPECT_EQ(read_idx(dir + "/f.gz")[0].item<float>(), 1.5f);
  write_gz(dir + "/d.gz", {0, 0, 0x0E, 1, 0, 0, 0, 1, 0xC0, 0x04, 0, 0, 0, 0, 0, 0});
  EXPECT_EQ(read_idx(dir + "/d.gz")[0].item<double>(), -2.5);
  write_gz(dir + "/s.gz", {0, 0, 0x0B, 1, 0, 0, 0, 1, 0x01, 0x02});
  EXPECT_EQ(read_idx(dir + "/s.gz")[0].item<int16_t>(), 258);
  write_gz(dir + "/b.gz", {0, 0, 0x09, 1, 0, 0, 0, 1, 0xFF});
  EXPECT_EQ(read_idx(dir + "/b.gz")[0].item<int8_t>(), -1);
}

TEST(Idx, MissingFileNamesIt) {
  const std::string path = "/nonexistent-dir/train-images-idx3-ubyte.gz";
  EXPECT_THROW(read_idx(path), lycoris::IOError);
  EXPECT_NE(error_of([&] { read_idx(path); }).find(path), std::string::npos);
}

TEST(Idx, WrongMagic) {
  auto dir = lycoris::test::temp_dir("idx");
  Bytes b = kImage;
  b[0] = 0x1F;
  write_gz(dir + "/m.gz", b);
  auto msg = error_of([&] { read_idx(dir + "/m.gz"); });
  EXPECT_NE(msg.find(dir + "/m.gz"), std::string::npos) << msg;
  EXPECT_NE(msg.find("magic"), std::string::npos) << msg;
}

TEST(Idx, UnknownTypeAndBadDims) {
  auto dir = lycoris::test::temp_dir("idx");
  Bytes b = kImage;
  b[2] = 0x07;
  write_gz(dir + "/t.gz", b);
  EXPECT_NE(error_of([&] { read_idx(dir + "/t.gz"); }).find("data type"), std::string::npos);
  b = kImage;
  b[3] = 0;
  write_gz(dir + "/n.gz", b);
  EXPECT_NE(error_of([&] { read_idx(dir + "/n.gz"); }).find("dimensions"), std::string::npos);
  b = kImage;
  b[7] = 0;  // first dimension 0
  write_gz(dir + "/z.gz", b);
  EXPECT_NE(error_of([&] { read_idx(dir + "/z.gz"); }).find("is 0"), std::string::npos);
  // 3 dims of 2^32-1 bytes: refused before allocating.
  write_gz(dir + "/huge.gz", {0, 0, 0x08, 3, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255});
  EXPECT_THROW(read_idx(dir + "/huge.gz"), lycoris::FormatError);
}

TEST(Idx, TruncatedAndTrailingData) {
  auto dir = lycoris::test::temp_dir("idx");
  Bytes shortb(kImage.begin(), kImage.end() - 2);
  write_gz(dir + "/short.gz", shortb);
  auto msg = error_of([&] { read_idx(dir + "/short.gz"); });
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  EXPECT_NE(msg.find(dir + "/short.gz"), std::string::npos) << msg;
  Bytes header_only(kImage.begin(), kImage.begin() + 6);
  write_gz(dir + "/hdr.gz", header_only);
  EXPECT_NE(error_of([&] { read_idx(dir + "/hdr.gz"); }).find("truncated"), std::string::npos);
  write_gz(dir + "/empty.gz", {});
  EXPECT_THROW(read_idx(dir + "/empty.gz"), lycoris::FormatError);
  Bytes longb = kImage;
  longb.push_back(7);
  write_gz(dir + "/long.gz", longb);
  EXPECT_NE(error_of([&] { read_idx(dir + "/long.gz"); }).find("trailing"), std::string::npos);
}

TEST(Idx, CorruptGzip) {
  auto dir = lycoris::test::temp_dir("idx");
  write_gz(dir + "/ok.gz", kImage);
  Bytes gz = read_raw(dir + "/ok.gz");
  // Cut the compressed stream in half: a gzip stream that ends early.
  write_raw(dir + "/cut.gz", Bytes(gz.begin(), gz.begin() + static_cast<long>(gz.size() / 2)));
  EXPECT_THROW(read_idx(dir + "/cut.gz"), lycoris::FormatError);
  // Flip a byte of the CRC-32 trailer (the 8 last bytes are CRC-32 + length).
  Bytes bad = gz;
  bad[bad.size() - 8] ^= 0xFF;
  write_raw(dir + "/crc.gz", bad);
  auto msg = error_of([&] { read_idx(dir + "/crc.gz"); });
  EXPECT_NE(msg.find(dir + "/crc.gz"), std::string::npos) << msg;
  // Garbage in the deflate data.
  Bytes garbage = gz;
  for (size_t i = 10; i < garbage.size() - 8; ++i) garbage[i] = 0xFF;
  write_raw(dir + "/garbage.gz", garbage);
  EXPECT_THROW(read_idx(dir + "/garbage.gz"), lycoris::FormatError);
}

TEST(Idx, DatasetPairsImagesAndLabels) {
  auto dir = lycoris::test::temp_dir("idx");
  // 2 images of 1×2 and 2 labels.
  write_gz(dir + "/train-images-idx3-ubyte.gz", {0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 255, 51, 102});
  write_gz(dir + "/train-labels-idx1-ubyte.gz", {0, 0, 8, 1, 0, 0, 0, 2, 3, 9});
  auto ds = lycoris::data::read_idx_dataset(dir, "train");
  EXPECT_EQ(ds.images.sizes(), (std::vector<int64_t>{2, 1, 1, 2}));
  EXPECT_EQ(ds.images.scalar_type(), torch::kFloat32);
  EXPECT_FLOAT_EQ(ds.images[0][0][0][1].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(ds.images[1][0][0][0].item<float>(), 0.2f);
  EXPECT_TRUE(torch::equal(ds.labels, torch::tensor({3, 9}, torch::kInt64)));
  // Count mismatch names both files.
  write_gz(dir + "/train-labels-idx1-ubyte.gz", {0, 0, 8, 1, 0, 0, 0, 3, 3, 9, 1});
  auto msg = error_of([&] { lycoris::data::read_idx_dataset(dir, "train"); });
  EXPECT_NE(msg.find("3 labels for 2 images"), std::string::npos) << msg;
  // Missing split.
  EXPECT_THROW(lycoris::data::read_idx_dataset(dir, "t10k"), lycoris::IOError);
}

}  // namespace

}  // namespace idx_test
