// safetensors reader/writer: dtype round trips, F8 decoding, zero-copy lifetime, alignment, writer
// padding / metadata / atomicity. Expected bytes come from the format definition (hand-built files).

#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>

#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace io_safetensors_test {

namespace fs = std::filesystem;
using namespace lycoris;
using namespace lycoris::io;

using lycoris::test::slurp;

namespace {

void write_raw(const std::string& path, const std::string& header, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>(n >> (8 * i)));
  out << header << data;
}

}  // namespace

TEST(IoDtype, TableIsConsistent) {
  struct Row {
    DType d;
    const char* name;
    size_t size;
  } rows[] = {{DType::F64, "F64", 8},  {DType::F32, "F32", 4},         {DType::F16, "F16", 2},
              {DType::BF16, "BF16", 2}, {DType::I64, "I64", 8},        {DType::I32, "I32", 4},
              {DType::I16, "I16", 2},  {DType::I8, "I8", 1},           {DType::U8, "U8", 1},
              {DType::BOOL, "BOOL", 1}, {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1}};
  for (const auto& r : rows) {
    EXPECT_STREQ(dtype_name(r.d), r.name);
    EXPECT_EQ(item_size(r.d), r.size) << r.name;
    DType parsed;
    ASSERT_TRUE(parse_dtype(r.name, parsed));
    EXPECT_EQ(parsed, r.d);
  }
  DType x;
  EXPECT_FALSE(parse_dtype("f32", x));
  EXPECT_FALSE(parse_dtype("U16", x));
  EXPECT_FALSE(parse_dtype("", x));
}

TEST(IoDtype, Float8E4M3Exact) {
  // e4m3fn: bias 7, 3 mantissa bits, no inf, S.1111.111 = NaN (OCP FP8 spec table values).
  EXPECT_EQ(f8_e4m3_to_f32(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(f8_e4m3_to_f32(0x80)));
  EXPECT_EQ(f8_e4m3_to_f32(0x38), 1.0f);                 // 0.0111.000
  EXPECT_EQ(f8_e4m3_to_f32(0x40), 2.0f);
  EXPECT_EQ(f8_e4m3_to_f32(0xC0), -2.0f);
  EXPECT_EQ(f8_e4m3_to_f32(0x7E), 448.0f);               // max normal 1.75·2^8
  EXPECT_EQ(f8_e4m3_to_f32(0x78), 256.0f);               // exponent 1111 is a normal binade
  EXPECT_EQ(f8_e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // min normal
  EXPECT_EQ(f8_e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // min subnormal
  EXPECT_EQ(f8_e4m3_to_f32(0x07), 7 * std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(f8_e4m3_to_f32(0x7F)));
  EXPECT_TRUE(std::isnan(f8_e4m3_to_f32(0xFF)));
  int nans = 0;
  for (int b = 0; b < 256; ++b) nans += std::isnan(f8_e4m3_to_f32(static_cast<uint8_t>(b)));
  EXPECT_EQ(nans, 2);
}

TEST(IoDtype, Float8E5M2Exact) {
  // e5m2: bias 15, 2 mantissa bits, IEEE inf/NaN (= the top byte of an IEEE half).
  EXPECT_EQ(f8_e5m2_to_f32(0x3C), 1.0f);
  EXPECT_EQ(f8_e5m2_to_f32(0x7B), 57344.0f);               // max normal 1.75·2^15
  EXPECT_EQ(f8_e5m2_to_f32(0x04), std::ldexp(1.0f, -14));  // min normal
  EXPECT_EQ(f8_e5m2_to_f32(0x01), std::ldexp(1.0f, -16));  // min subnormal
  EXPECT_EQ(f8_e5m2_to_f32(0x7C), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f8_e5m2_to_f32(0xFC), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f8_e5m2_to_f32(0x7D)));
  EXPECT_TRUE(std::isnan(f8_e5m2_to_f32(0xFF)));
  // Every non-NaN value equals the IEEE half with the same top byte.
  for (int b = 0; b < 256; ++b) {
    float f8 = f8_e5m2_to_f32(static_cast<uint8_t>(b));
    auto half = torch::tensor({static_cast<int16_t>(b << 8)}, torch::kInt16).view(torch::kFloat16).item<float>();
    if (std::isnan(half))
      EXPECT_TRUE(std::isnan(f8)) << b;
    else
      EXPECT_EQ(f8, half) << b;
  }
}

TEST(IoSafetensors, RoundTripEveryDtype) {
  auto dir = lycoris::test::temp_dir("io-rt");
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  auto base = torch::tensor({-3.5, -1.0, 0.0, 0.25, 1.0, 2.0, 100.0, 7.0}, torch::kFloat64).reshape({2, 4});
  for (auto type : {torch::kFloat64, torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kInt64, torch::kInt32,
                    torch::kInt16, torch::kInt8})
    tensors.emplace_back(std::string("t_") + c10::toString(type), base.to(type));
  tensors.emplace_back("t_u8", torch::tensor({0, 1, 128, 255}, torch::kUInt8));
  tensors.emplace_back("t_bool", torch::tensor({true, false, true}, torch::kBool));
  tensors.emplace_back("t_scalar", torch::tensor(0.5f));          // 0-dim
  tensors.emplace_back("t_empty", torch::zeros({0, 3}));           // zero elements
  tensors.emplace_back("t_noncontig", base.to(torch::kFloat32).t());  // written contiguous
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"ünïcode", "välue \"q\"\n"}, {"empty", ""}};
  auto path = dir + "/rt.safetensors";
  save_file(path, tensors, meta);

  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.tensors().size(), tensors.size());
  // Declaration order is file order.
  for (size_t i = 0; i < tensors.size(); ++i) EXPECT_EQ(f.names()[i], tensors[i].first);
  for (const auto& [name, t] : tensors) {
    auto r = f.tensor(name);
    EXPECT_EQ(r.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(r.sizes(), t.sizes()) << name;
    EXPECT_TRUE(torch::equal(r, t)) << name;
    EXPECT_EQ(from_torch(t.scalar_type()), f.info(name).dtype);
  }
  // Padding: data starts at a multiple of 8; header is padded with spaces.
  auto bytes = slurp(path);
  EXPECT_EQ(f.header().data_start % 8, 0u);
  EXPECT_EQ(bytes.size(), f.file_size());
  EXPECT_EQ(bytes[f.header().data_start - 1] == ' ' || bytes[f.header().data_start - 1] == '}', true);
  // Every declared byte is there (I64 tensor of 8 elements: 64 bytes at its offsets).
  const auto& info = f.info("t_Long");
  EXPECT_EQ(info.nbytes(), 64u);
  int64_t first;
  std::memcpy(&first, bytes.data() + f.header().data_start + info.begin, 8);
  EXPECT_EQ(first, -3);
  EXPECT_EQ(test::listing(dir).size(), 1u);  // no temporary left behind
}

TEST(IoSafetensors, HeaderPaddingToEightBytes) {
  auto dir = lycoris::test::temp_dir("io-pad");
  for (int len = 1; len <= 9; ++len) {
    auto path = dir + "/p" + std::to_string(len) + ".safetensors";
    save_file(path, {{std::string(len, 'k'), torch::ones({1})}});
    auto bytes = slurp(path);
    uint64_t n;
    std::memcpy(&n, bytes.data(), 8);
    EXPECT_EQ(n % 8, 0u) << len;
    EXPECT_EQ(bytes.size(), 8 + n + 4);
    auto json = bytes.substr(8, n);
    auto close = json.find_last_of('}');
    EXPECT_EQ(json.find_first_not_of(' ', close + 1), std::string::npos);  // only spaces after the object
    EXPECT_EQ(SafetensorsFile::open(path).tensor(std::string(len, 'k')).item<float>(), 1.0f);
  }
}

TEST(IoSafetensors, ZeroCopyViewOutlivesFile) {
  auto dir = lycoris::test::temp_dir("io-zc");
  auto path = dir + "/z.safetensors";
  save_file(path, {{"a", torch::arange(16, torch::kFloat32)}, {"b", torch::arange(3, torch::kInt64)}});
  torch::Tensor a;
  const void* mapped;
  {
    auto f = SafetensorsFile::open(path);
    a = f.tensor("a");
    mapped = f.data(f.info("a"));
    EXPECT_EQ(a.data_ptr(), mapped);  // zero-copy: backed by the mapping
    // Converting overload: view when nothing changes, copy when asked or when the dtype differs.
    EXPECT_EQ(f.tensor("a", torch::kFloat32).data_ptr(), mapped);
    EXPECT_NE(f.tensor("a", torch::kFloat32, torch::kCPU, true).data_ptr(), mapped);
    auto d = f.tensor("a", torch::kFloat64);
    EXPECT_EQ(d.scalar_type(), torch::kFloat64);
    EXPECT_TRUE(torch::equal(d, torch::arange(16, torch::kFloat64)));
    auto all = f.all();
    EXPECT_EQ(all.size(), 2u);
    EXPECT_TRUE(torch::equal(all.at("b"), torch::arange(3, torch::kInt64)));
  }
  fs::remove(path);  // the mapping (kept alive by `a`) survives unlink too
  EXPECT_TRUE(torch::equal(a, torch::arange(16, torch::kFloat32)));
  EXPECT_EQ(a.sum().item<float>(), 120.0f);
}

TEST(IoSafetensors, UnalignedDataGivesAlignedCopy) {
  auto dir = lycoris::test::temp_dir("io-al");
  auto path = dir + "/u.safetensors";
  // Header of 55 bytes: data starts at byte 63, so the F32 data is misaligned.
  std::string h = R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})";
  ASSERT_EQ(h.size() % 4, 3u);
  float v[3] = {1.5f, -2.0f, 3.25f};
  write_raw(path, h, std::string(reinterpret_cast<char*>(v), 12));
  auto f = SafetensorsFile::open(path);
  auto a = f.tensor("a");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data_ptr()) % 4, 0u);
  EXPECT_TRUE(torch::equal(a, torch::tensor({1.5f, -2.0f, 3.25f})));
}

TEST(IoSafetensors, Float8ReadAsFloat32) {
  auto dir = lycoris::test::temp_dir("io-f8");
  auto path = dir + "/f8.safetensors";
  std::string h =
      R"({"e4":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[0,4]},"e5":{"dtype":"F8_E5M2","shape":[3],"data_offsets":[4,7]}})";
  write_raw(path, h, std::string("\x38\x7E\x01\xC0" "\x3C\x7C\x7D", 7));
  auto f = SafetensorsFile::open(path);
  auto e4 = f.tensor("e4");
  EXPECT_EQ(e4.scalar_type(), torch::kFloat32);
  EXPECT_EQ(e4.sizes(), torch::IntArrayRef({2, 2}));
  EXPECT_TRUE(torch::equal(e4, torch::tensor({1.0f, 448.0f, std::ldexp(1.0f, -9), -2.0f}).reshape({2, 2})));
  auto e5 = f.tensor("e5", torch::kFloat64);
  EXPECT_EQ(e5[0].item<double>(), 1.0);
  EXPECT_TRUE(std::isinf(e5[1].item<double>()));
  EXPECT_TRUE(std::isnan(e5[2].item<double>()));
  EXPECT_THROW(to_torch(DType::F8_E4M3), FormatError);
  // Raw copy of F8 data with write_bytes round-trips byte for byte.
  auto out = dir + "/f8copy.safetensors";
  {
    SafetensorsWriter w(out, {{"e4", DType::F8_E4M3, {2, 2}}});
    EXPECT_THROW(w.write("e4", torch::zeros({2, 2})), FormatError);
  }
  SafetensorsWriter w(out, {{"e4", DType::F8_E4M3, {2, 2}}});
  w.write_bytes("e4", f.data(f.info("e4")), 4);
  w.commit();
  EXPECT_TRUE(torch::equal(SafetensorsFile::open(out).tensor("e4"), e4));
}

TEST(IoSafetensors, WriterStreamsInDeclarationOrder) {
  auto dir = lycoris::test::temp_dir("io-w");
  auto path = dir + "/w.safetensors";
  SafetensorsWriter w(path, {{"z", DType::F16, {2}}, {"a", DType::I32, {1, 2}}}, {{"k", "v"}});
  EXPECT_THROW(w.write("a", torch::zeros({1, 2}, torch::kInt32)), KeyError);  // out of order
  EXPECT_THROW(w.write("z", torch::zeros({3}, torch::kFloat16)), ShapeError);  // wrong shape
  EXPECT_THROW(w.write("z", torch::zeros({2}, torch::kFloat32)), ShapeError);  // wrong dtype
  EXPECT_THROW(w.write_bytes("z", "abc", 3), ShapeError);                     // wrong byte count
  w.write("z", torch::tensor({1.0, 2.0}, torch::kFloat16));
  EXPECT_THROW(w.commit(), KeyError);  // "a" not written yet
  EXPECT_FALSE(fs::exists(path));
  w.write("a", torch::tensor({{7, 8}}, torch::kInt32));
  w.commit();
  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"z", "a"}));
  EXPECT_EQ(f.info("z").begin, 0u);
  EXPECT_EQ(f.info("a").begin, 4u);
  EXPECT_EQ(f.metadata().at("k"), "v");
  EXPECT_TRUE(torch::equal(f.tensor("a"), torch::tensor({{7, 8}}, torch::kInt32)));
  EXPECT_EQ(test::listing(dir).size(), 1u);
}

TEST(IoSafetensors, WriterIsAtomic) {
  auto dir = lycoris::test::temp_dir("io-atomic");
  auto path = dir + "/model.safetensors";
  save_file(path, {{"old", torch::ones({4})}});
  const auto before = slurp(path);
  // An exception in the middle of writing: destination untouched, temporary removed. The temporary has
  // no name at all (O_TMPFILE) or, where that is unavailable, a name in the same directory.
  for (bool named : {false, true}) {
    if (named) setenv("LYCORIS_NO_TMPFILE", "1", 1);
    try {
      SafetensorsWriter w(path, {{"a", DType::F32, {1000}}, {"b", DType::F32, {1000}}});
      w.write("a", torch::zeros({1000}));
      EXPECT_EQ(test::listing(dir).size(), named ? 2u : 1u);
      throw std::runtime_error("simulated failure");
    } catch (const std::runtime_error&) {
    }
    unsetenv("LYCORIS_NO_TMPFILE");
    EXPECT_EQ(slurp(path), before);
    EXPECT_EQ(test::listing(dir).size(), 1u);
  }
  // A writer never committed (nothing written at all) also leaves no trace.
  { SafetensorsWriter w(dir + "/new.safetensors", {{"a", DType::F32, {1}}}); }
  EXPECT_FALSE(fs::exists(dir + "/new.safetensors"));
  EXPECT_EQ(test::listing(dir).size(), 1u);
  // save_file failing on an undefined tensor: destination untouched.
  EXPECT_THROW(save_file(path, {{"x", torch::ones({2})}, {"y", torch::Tensor()}}), ShapeError);
  EXPECT_EQ(slurp(path), before);
  // Writing into a missing directory: IOError naming the file.
  try {
    save_file(dir + "/missing/x.safetensors", {{"x", torch::ones({1})}});
    FAIL() << "expected IOError";
  } catch (const IOError& e) {
    EXPECT_NE(std::string(e.what()).find("missing/x.safetensors"), std::string::npos) << e.what();
  }
  // Successful overwrite replaces the content.
  save_file(path, {{"new", torch::zeros({2})}});
  EXPECT_TRUE(SafetensorsFile::open(path).contains("new"));
  EXPECT_FALSE(SafetensorsFile::open(path).contains("old"));
  EXPECT_EQ(test::listing(dir).size(), 1u);
}

TEST(IoSafetensors, WriterDiskErrorLeavesNoTrace) {
  // A real write failure (file size limit → EFBIG, like a full disk) in the middle of the data.
  auto dir = lycoris::test::temp_dir("io-efbig");
  auto path = dir + "/model.safetensors";
  save_file(path, {{"old", torch::ones({4})}});
  const auto before = slurp(path);
  auto limit = std::make_unique<lycoris::test::FileSizeLimit>(64 * 1024);
  ASSERT_TRUE(limit->ok());
  std::string message;
  try {
    save_file(path, {{"a", torch::zeros({1024})}, {"big", torch::zeros({1 << 20})}});
  } catch (const IOError& e) {
    message = e.what();
  }
  limit.reset();
  EXPECT_NE(message.find(path + ": write failed"), std::string::npos) << message;
  EXPECT_EQ(slurp(path), before);
  EXPECT_EQ(test::listing(dir).size(), 1u);
}

// Files of 64 MiB and more go through the O_DIRECT staging path (aligned buffers, background pwrite,
// padded tail cut back by ftruncate): byte-exact content and size, odd tensor sizes straddling the
// staging buffers; on tmpfs (no O_DIRECT) the buffered fallback gives the same bytes.
TEST(IoSafetensors, WriterLargeFileByteExact) {
  std::vector<std::string> dirs = {lycoris::test::temp_dir("io-large")};
  if (fs::is_directory("/dev/shm")) {
    auto shm = "/dev/shm/lycoris-io-large-" + std::to_string(getpid());
    fs::create_directories(shm);
    dirs.push_back(shm);
  }
  torch::manual_seed(7);
  std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      {"a", torch::randint(0, 256, {12345}, torch::kUInt8)},
      {"b", torch::randn({(33 << 20) / 2 + 3}).to(torch::kFloat16)},  // crosses the first 32 MiB buffer
      {"c", torch::randn({9 << 20})},                                   // 36 MiB: crosses another
      {"d", torch::randint(0, 256, {4097}, torch::kUInt8)}};          // odd tail
  for (const auto& dir : dirs) {
    auto path = dir + "/large.safetensors";
    save_file(path, tensors, {{"k", "v"}});
    auto f = SafetensorsFile::open(path);
    uint64_t data = 0;
    for (const auto& kv : tensors) {
      EXPECT_TRUE(torch::equal(f.tensor(kv.first), kv.second)) << dir << " " << kv.first;
      data += static_cast<uint64_t>(kv.second.nbytes());
    }
    EXPECT_EQ(f.file_size(), f.header().data_start + data) << dir;
    EXPECT_EQ(fs::file_size(path), f.file_size()) << dir;
    EXPECT_EQ(test::listing(dir).size(), 1u) << dir;
  }
  if (dirs.size() > 1) fs::remove_all(dirs[1]);
}

// A write failure in the background pwrite of the direct path surfaces as the same IOError.
TEST(IoSafetensors, WriterLargeFileDiskErrorLeavesNoTrace) {
  auto dir = lycoris::test::temp_dir("io-large-efbig");
  auto path = dir + "/model.safetensors";
  auto limit = std::make_unique<lycoris::test::FileSizeLimit>(40ull << 20);
  ASSERT_TRUE(limit->ok());
  std::string message;
  try {
    save_file(path, {{"big", torch::zeros({20 << 20})}});  // 80 MiB
  } catch (const IOError& e) {
    message = e.what();
  }
  limit.reset();
  EXPECT_NE(message.find(path + ": "), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(path));
  EXPECT_EQ(test::listing(dir).size(), 0u);
}

TEST(IoSafetensors, WriterRejectsBadDeclarations) {
  auto dir = lycoris::test::temp_dir("io-decl");
  EXPECT_THROW(SafetensorsWriter(dir + "/a.safetensors", {{"a", DType::F32, {1}}, {"a", DType::F32, {1}}}),
               FormatError);
  EXPECT_THROW(SafetensorsWriter(dir + "/a.safetensors", {{"__metadata__", DType::F32, {1}}}), FormatError);
  EXPECT_THROW(SafetensorsWriter(dir + "/a.safetensors", {{"a", DType::F32, {-1}}}), ShapeError);
  EXPECT_THROW(SafetensorsWriter(dir + "/a.safetensors", {{"a", DType::F64, {1LL << 62}}}), ShapeError);
  EXPECT_THROW(from_torch(torch::kComplexFloat), FormatError);
  EXPECT_EQ(test::listing(dir).size(), 0u);
}

TEST(IoSafetensors, OpenErrors) {
  auto dir = lycoris::test::temp_dir("io-open");
  EXPECT_THROW(SafetensorsFile::open(dir + "/nope.safetensors"), IOError);
  EXPECT_THROW(SafetensorsFile::open(dir), IOError);  // a directory
  save_file(dir + "/k.safetensors", {{"a", torch::ones({1})}});
  try {
    SafetensorsFile::open(dir + "/k.safetensors").tensor("b");
    FAIL();
  } catch (const KeyError& e) {
    EXPECT_NE(std::string(e.what()).find("k.safetensors: no tensor named 'b'"), std::string::npos);
  }
}

}  // namespace io_safetensors_test
