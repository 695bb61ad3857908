// parse_header beyond the malformed corpus: a header of 100k tensors (parsing must stay linear), and files
// of other formats — real PyTorch archives and pickles written by libtorch, hand-built magic numbers of the
// others — named as such instead of an absurd header length, while safetensors files whose first bytes
// happen to look like another format still load.
#include <torch/csrc/jit/serialization/pickle.h>

#include <filesystem>
#include <fstream>

#include "lycoris/error.hpp"
#include "lycoris/io/header.hpp"
#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace io_header_test {

using namespace lycoris;
using namespace lycoris::io;

using lycoris::test::slurp;

namespace {

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
  return s;
}

// The FormatError message of parse_header on `bytes` ("" if it parses).
std::string header_error(const std::string& bytes, const std::string& file) {
  try {
    parse_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), file);
    return "";
  } catch (const FormatError& e) {
    return e.what();
  }
}

}  // namespace

// 100k tensors of four dtypes/shapes, written by SafetensorsWriter: every name, shape, offset and byte read
// back. (Parsing was quadratic in the tensor count: a header this size did not finish in minutes.)
TEST(IoHeader, HundredThousandTensors) {
  struct Kind {
    DType dtype;
    std::vector<int64_t> shape;
    size_t bytes;
  };
  const Kind kinds[] = {{DType::F32, {2, 2}, 16}, {DType::F16, {3}, 6}, {DType::U8, {1}, 1}, {DType::I64, {}, 8}};
  constexpr int kCount = 100000;
  std::vector<TensorDecl> decls;
  for (int i = 0; i < kCount; ++i) {
    const Kind& k = kinds[i % 4];
    decls.push_back({"model.layers." + std::to_string(i) + ".lora_down.weight", k.dtype, k.shape});
  }
  const auto path = lycoris::test::temp_dir("io-header-100k") + "/many.safetensors";
  {
    SafetensorsWriter w(path, decls, {{"format", "pt"}, {"count", std::to_string(kCount)}});
    std::vector<uint8_t> bytes;
    for (int i = 0; i < kCount; ++i) {
      bytes.assign(kinds[i % 4].bytes, static_cast<uint8_t>(i % 251));
      w.write_bytes(decls[static_cast<size_t>(i)].name, bytes.data(), bytes.size());
    }
    w.commit();
  }
  auto f = SafetensorsFile::open(path);
  EXPECT_GT(f.header().header_size, 7'000'000u);
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"count", "100000"}}));
  ASSERT_EQ(f.tensors().size(), static_cast<size_t>(kCount));
  uint64_t offset = 0;
  for (int i = 0; i < kCount; ++i) {
    const TensorInfo& t = f.tensors()[static_cast<size_t>(i)];  // file order = declaration order
    const TensorDecl& d = decls[static_cast<size_t>(i)];
    ASSERT_EQ(t.name, d.name);
    ASSERT_EQ(t.dtype, d.dtype) << d.name;
    ASSERT_EQ(t.shape, d.shape) << d.name;
    ASSERT_EQ(t.begin, offset) << d.name;
    offset = t.end;
    ASSERT_EQ(&f.info(d.name), &t);
    ASSERT_EQ(f.data(t)[t.nbytes() - 1], static_cast<uint8_t>(i % 251)) << d.name;
  }
  EXPECT_EQ(f.header().data_start + offset, f.file_size());
  EXPECT_EQ(f.tensor("model.layers.99999.lora_down.weight").item<int64_t>(),
            static_cast<int64_t>(0x0101010101010101ull * (99999 % 251)));
}

// Each format's file, as its tool writes it (or its documented magic number): one line naming the format.
TEST(IoHeader, OtherFormatsNamed) {
  const auto dir = lycoris::test::temp_dir("io-header-formats");
  // libtorch writes the formats of torch.save / torch.jit.save: a ZIP archive, a pickle inside
  torch::save(torch::ones({2, 3}), dir + "/tensor.pt");
  write_all(dir + "/ivalue.pt", [] {
    auto v = torch::pickle_save(c10::IValue(torch::ones({4})));
    return std::string(v.begin(), v.end());
  }());
  const auto pickle = [] {
    auto v = torch::jit::pickle(c10::IValue(c10::List<int64_t>({1, 2, 3})));
    return std::string(v.begin(), v.end());
  }();
  ASSERT_EQ(pickle.substr(0, 2), std::string("\x80\x02", 2));
  struct Case {
    std::string name, bytes, expected;
  };
  const std::vector<Case> cases = {
      {"tensor.pt", slurp(dir + "/tensor.pt"), "this is a ZIP archive (a PyTorch .pt/.pth/.ckpt checkpoint"},
      {"ivalue.pt", slurp(dir + "/ivalue.pt"), "this is a ZIP archive"},
      // torch.save's flags 0x0808 at bytes 6-7: the length read was 578712552184433488
      {"model.ckpt", std::string("PK\x03\x04\x00\x00\x08\x08\x00\x00", 10) + std::string(54, 'x'), "ZIP archive"},
      // version 0, flags 0: a length of 67324752 bytes, past the end of this small file
      {"small.pth", std::string("PK\x03\x04\x00\x00\x00\x00\x00\x00", 10) + std::string(54, 'x'), "ZIP archive"},
      {"list.pkl", pickle, "this is a Python pickle"},
      // pickle protocol 4 (FRAME opcode and length), as Python's pickle.dump writes by default
      {"data.pkl", std::string("\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00}\x94.", 14), "Python pickle"},
      // length bytes that read as a plausible 640-byte header, followed by no JSON
      {"short.pkl", std::string("\x80\x02\0\0\0\0\0\0", 8) + std::string(640, '('), "Python pickle"},
      {"model.gguf", std::string("GGUF\x03\x00\x00\x00", 8) + std::string(16, '\0'), "this is a GGUF file"},
      {"model.h5", std::string("\x89HDF\r\n\x1a\n", 8) + std::string(40, '\0'), "this is an HDF5 file"},
      {"w.npy", std::string("\x93NUMPY\x01\x00\x76\x00", 10) + "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
       "this is a NumPy .npy array"},
      {"model.safetensors.gz", std::string("\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03", 10) + std::string(20, '\0'),
       "this is a gzip-compressed file"},
      {"lfs.safetensors",
       "version https://git-lfs.github.com/spec/v1\noid sha256:"
       "4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1719\n",
       "this is a Git LFS pointer"},
      {"page.safetensors", "<!DOCTYPE html>\n<html><head><title>Error</title></head></html>\n", "HTML page"},
  };
  for (const auto& c : cases) {
    const std::string file = dir + "/" + c.name;
    const std::string prefix = file + ": header: not a safetensors file: ";
    write_all(file, c.bytes);
    std::string msg;
    try {
      SafetensorsFile::open(file);
    } catch (const FormatError& e) {
      msg = e.what();
    }
    EXPECT_EQ(msg.rfind(prefix, 0), 0u) << c.name << ": " << msg;
    EXPECT_NE(msg.find(c.expected, prefix.size()), std::string::npos) << c.name << ": " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

// Files whose length bytes happen to begin like a pickle or gzip are safetensors as long as their header is
// JSON: valid ones load, damaged ones keep the JSON error.
TEST(IoHeader, SafetensorsLookingLikeOtherFormats) {
  const auto dir = lycoris::test::temp_dir("io-header-lookalike");
  // header lengths 0x280 ("\x80\x02": pickle protocol 2) and 0x8B1F ("\x1f\x8b": gzip)
  for (uint64_t n : {0x280ull, 0x8B1Full}) {
    std::string json = R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
    json.resize(n, ' ');
    const std::string one("\x00\x00\x80\x3f", 4);  // 1.0f
    const std::string file = dir + "/n" + std::to_string(n) + ".safetensors";
    write_all(file, le64(n) + json + one);
    auto f = SafetensorsFile::open(file);
    EXPECT_EQ(f.header().header_size, n);
    EXPECT_EQ(f.tensor("a").item<float>(), 1.0f);

    std::string damaged = json;
    damaged[json.find("dtype") - 1] = '!';
    const std::string msg = header_error(le64(n) + damaged + one, "x.safetensors");
    EXPECT_EQ(msg.rfind("x.safetensors: header: not valid JSON: ", 0), 0u) << msg;
  }
}

}  // namespace io_header_test
