// Inputs that are not regular files — a FIFO, a character device, a directory — are refused at once with
// an IOError naming the path and what it is, by SafetensorsFile::open and by SafetensorsRewriter (which
// opens its input again). A FIFO without a writer used to block open() forever: each open runs on a
// thread with a deadline, so that a regression fails instead of hanging the suite.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <future>

#include "lycoris/error.hpp"
#include "lycoris/io/rewriter.hpp"
#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace io_input_test {

namespace fs = std::filesystem;
using namespace lycoris;
using namespace lycoris::io;

namespace {

// The IOError message of `open_input()` ("no error" if it returns, "other error: …" for another
// exception), or "timed out" when it has not returned after 10 s: then `fifo` (if given) is opened for
// writing, which releases an open() blocked on it.
std::string io_error_in_time(const std::function<void()>& open_input, const std::string& fifo = "") {
  auto result = std::async(std::launch::async, [open_input]() -> std::string {
    try {
      open_input();
      return "no error";
    } catch (const IOError& e) {
      return e.what();
    } catch (const std::exception& e) {
      return std::string("other error: ") + e.what();
    }
  });
  if (result.wait_for(std::chrono::seconds(10)) == std::future_status::ready) return result.get();
  const int writer = fifo.empty() ? -1 : ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  result.wait();
  if (writer >= 0) ::close(writer);
  return "timed out";
}

}  // namespace

TEST(IoInput, FifoRefusedWithoutBlocking) {
  const auto dir = lycoris::test::temp_dir("io-input-fifo");
  const auto fifo = dir + "/adapter.safetensors";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(io_error_in_time([&] { SafetensorsFile::open(fifo); }, fifo), fifo + ": is a FIFO, not a regular file");

  // the rewriter is handed a parsed header and opens the input path itself
  save_file(dir + "/base.safetensors", {{"w", torch::ones({4})}});
  const Header header = SafetensorsFile::open(dir + "/base.safetensors").header();
  for (bool direct : {true, false}) {
    SafetensorsRewriter::Options options;
    options.window_bytes = 4 << 20;
    options.direct_read = direct;
    EXPECT_EQ(io_error_in_time([&] { SafetensorsRewriter(fifo, header, dir + "/out.safetensors", {}, options); }, fifo),
              fifo + ": is a FIFO, not a regular file")
        << "direct_read " << direct;
  }
  EXPECT_FALSE(fs::exists(dir + "/out.safetensors"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 2);  // no temporary left
}

TEST(IoInput, DeviceAndDirectoryRefused) {
  for (const char* device : {"/dev/null", "/dev/zero"}) {
    if (!fs::exists(device)) continue;
    EXPECT_EQ(io_error_in_time([&] { SafetensorsFile::open(device); }),
              std::string(device) + ": is a character device, not a regular file");
  }
  const auto dir = lycoris::test::temp_dir("io-input-dir");
  EXPECT_EQ(io_error_in_time([&] { SafetensorsFile::open(dir); }), dir + ": is a directory, not a regular file");
  EXPECT_EQ(io_error_in_time([&] { SafetensorsFile::open(dir + "/missing.safetensors"); }),
            dir + "/missing.safetensors: cannot open: No such file or directory");
}

}  // namespace io_input_test
