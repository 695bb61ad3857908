// SafetensorsRewriter: every byte of the input reaches the output (edited in place where the caller
// edits), through a window much smaller than the file (wrapping around the ring many times), with the
// output's data at the input's offset modulo 4096; O_DIRECT and buffered (tmpfs) paths; failures leave
// no output and no temporary file. Expected values: the input file's own tensors (read independently by
// SafetensorsFile) and the edits applied to them here.
#include <unistd.h>

#include <filesystem>
#include <memory>

#include "lycoris/error.hpp"
#include "lycoris/io/rewriter.hpp"
#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace io_rewriter_test {

namespace fs = std::filesystem;
using lycoris::io::SafetensorsFile;
using lycoris::io::SafetensorsRewriter;

// ~70 MB of tensors of odd sizes (fp16, fp32, u8, empty) and one of 9 MB.
std::vector<std::pair<std::string, torch::Tensor>> sample_tensors() {
  torch::manual_seed(3);
  std::vector<std::pair<std::string, torch::Tensor>> t;
  t.push_back({"empty", torch::zeros({0, 4})});
  for (int i = 0; i < 20; ++i) {
    t.push_back({"w" + std::to_string(i), torch::randn({1000 + 37 * i, 1531}).to(torch::kFloat16)});
    t.push_back({"b" + std::to_string(i), torch::randint(0, 256, {4097 + i}, torch::kUInt8)});
  }
  t.push_back({"big", torch::randn({9 << 18})});  // 9 MiB fp32
  t.push_back({"tail", torch::randn({3})});
  return t;
}

// Rewrites `in` to `out`, negating every fp16 tensor in place; checks each tensor's bytes on the way.
void rewrite_negating_halves(const std::string& in, const std::string& out, SafetensorsRewriter::Options o) {
  auto src = SafetensorsFile::open(in);
  SafetensorsRewriter rw(in, src.header(), out, {{"new", "metadata"}}, o);
  for (size_t i = 0; i < src.header().tensors.size(); ++i) {
    const auto& info = src.header().tensors[i];
    uint8_t* bytes = rw.acquire(i);
    auto view = torch::from_blob(bytes, info.shape, src.tensor(info.name).options());
    ASSERT_TRUE(torch::equal(view, src.tensor(info.name))) << info.name;
    if (info.dtype == lycoris::io::DType::F16) view.neg_();
    rw.release(i);
  }
  rw.commit();
}

TEST(IoRewriter, EveryByteThroughASmallWindowWithEditsInPlace) {
  const auto tensors = sample_tensors();
  std::vector<std::string> dirs = {lycoris::test::temp_dir("io-rewriter")};
  if (fs::is_directory("/dev/shm")) {  // tmpfs: no O_DIRECT, the buffered fallback
    dirs.push_back("/dev/shm/lycoris-io-rewriter-" + std::to_string(getpid()));
    fs::create_directories(dirs.back());
  }
  for (const auto& dir : dirs)
    for (bool direct_read : {true, false}) {
      const auto in = dir + "/in.safetensors", out = dir + "/out.safetensors";
      lycoris::io::save_file(in, tensors, {{"old", "x"}});
      SafetensorsRewriter::Options o;
      o.window_bytes = 1;  // the smallest window: the largest tensor + a read chunk + a write batch
      o.direct_read = direct_read;
      rewrite_negating_halves(in, out, o);
      auto a = SafetensorsFile::open(in), b = SafetensorsFile::open(out);
      EXPECT_EQ(b.header().metadata, (std::map<std::string, std::string>{{"new", "metadata"}}));
      EXPECT_EQ(b.header().data_start % 4096, a.header().data_start % 4096);
      EXPECT_EQ(b.file_size(), b.header().data_start + (a.file_size() - a.header().data_start));
      ASSERT_EQ(b.header().tensors.size(), tensors.size());
      for (const auto& [name, t] : tensors) {
        auto expected = t.scalar_type() == torch::kFloat16 ? -t : t;
        EXPECT_TRUE(torch::equal(b.tensor(name), expected)) << dir << " " << name;
      }
      EXPECT_EQ(lycoris::test::listing(dir).size(), 2u) << dir;  // in + out, no temporary left
      fs::remove(in);
      fs::remove(out);
    }
  if (dirs.size() > 1) fs::remove_all(dirs[1]);
}

TEST(IoRewriter, FilesWithoutData) {
  const auto dir = lycoris::test::temp_dir("io-rewriter-empty");
  // repeated: the header's last block is written only after the reader has put it in the window
  for (int repeat = 0; repeat < 20; ++repeat)
  for (const auto& tensors : std::vector<std::vector<std::pair<std::string, torch::Tensor>>>{
           {}, {{"e", torch::zeros({0})}, {"f", torch::zeros({2, 0})}}}) {
    const auto in = dir + "/in.safetensors", out = dir + "/out.safetensors";
    lycoris::io::save_file(in, tensors);
    auto src = SafetensorsFile::open(in);
    SafetensorsRewriter rw(in, src.header(), out, {{"k", "v"}});
    for (size_t i = 0; i < tensors.size(); ++i) {
      rw.acquire(i);
      rw.release(i);
    }
    rw.commit();
    auto b = SafetensorsFile::open(out);
    EXPECT_EQ(b.header().tensors.size(), tensors.size());
    EXPECT_EQ(b.header().metadata.at("k"), "v");
    EXPECT_EQ(b.file_size(), b.header().data_start);
  }
}

TEST(IoRewriter, MisuseAndAbandonLeaveNoOutput) {
  const auto dir = lycoris::test::temp_dir("io-rewriter-misuse");
  const auto in = dir + "/in.safetensors", out = dir + "/out.safetensors";
  lycoris::io::save_file(in, {{"a", torch::ones({8})}, {"b", torch::ones({8})}});
  auto src = SafetensorsFile::open(in);
  {
    SafetensorsRewriter rw(in, src.header(), out, {});
    EXPECT_THROW(rw.acquire(1), lycoris::Error);  // out of order
    rw.acquire(0);
    EXPECT_THROW(rw.acquire(1), lycoris::Error);  // 0 not released
    rw.release(0);
    EXPECT_THROW(rw.commit(), lycoris::KeyError);  // b never released
  }  // abandoned
  EXPECT_FALSE(fs::exists(out));
  EXPECT_EQ(lycoris::test::listing(dir).size(), 1u);
}

TEST(IoRewriter, InputTruncatedWhileReading) {
  const auto dir = lycoris::test::temp_dir("io-rewriter-truncated");
  const auto in = dir + "/in.safetensors", out = dir + "/out.safetensors";
  lycoris::io::save_file(in, {{"a", torch::ones({1 << 20})}, {"b", torch::ones({1 << 20})}});
  auto src = SafetensorsFile::open(in);
  const auto header = src.header();
  fs::resize_file(in, header.data_start + (4 << 20) + 100);  // b loses most of its bytes
  std::string message;
  try {
    SafetensorsRewriter rw(in, header, out, {});
    rw.acquire(0);
    rw.release(0);
    rw.acquire(1);
  } catch (const lycoris::IOError& e) {
    message = e.what();
  }
  EXPECT_NE(message.find(in + ": unexpected end of file"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_EQ(lycoris::test::listing(dir).size(), 1u);
}

TEST(IoRewriter, WriteErrorLeavesNoTrace) {
  const auto dir = lycoris::test::temp_dir("io-rewriter-efbig");
  const auto in = dir + "/in.safetensors", out = dir + "/out.safetensors";
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (int i = 0; i < 8; ++i) tensors.push_back({"t" + std::to_string(i), torch::zeros({5 << 20})});  // 8 × 20 MiB
  lycoris::io::save_file(in, tensors);
  auto src = SafetensorsFile::open(in);
  SafetensorsRewriter::Options o;
  o.window_bytes = 1;  // ≈ 46 MiB of ring (a memfd: the file size limit applies to it too)
  auto limit = std::make_unique<lycoris::test::FileSizeLimit>(100ull << 20);
  ASSERT_TRUE(limit->ok());
  std::string message;
  try {
    SafetensorsRewriter rw(in, src.header(), out, {}, o);
    for (size_t i = 0; i < tensors.size(); ++i) {
      rw.acquire(i);
      rw.release(i);
    }
    rw.commit();
  } catch (const lycoris::Error& e) {
    message = e.what();
  }
  limit.reset();
  EXPECT_NE(message.find(out + ": write failed"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_EQ(lycoris::test::listing(dir).size(), 1u);
}

}  // namespace io_rewriter_test
