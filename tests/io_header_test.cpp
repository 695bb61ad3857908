// parse_header beyond the malformed corpus: a header of 100k tensors (parsing must stay linear).
#include "lycoris/error.hpp"
#include "lycoris/io/header.hpp"
#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace io_header_test {

using namespace lycoris;
using namespace lycoris::io;

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

}  // namespace io_header_test
