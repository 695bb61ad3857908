// Shared test helpers.
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

namespace lycoris::test {

// Absolute path of a file under tests/data.
std::string data_path(const std::string& relative);
// A fresh empty temporary directory (removed at process exit is not guaranteed).
std::string temp_dir(const std::string& tag);
// Max |a-b| - (atol + rtol|b|) over elements; <= 0 means allclose. Shapes must match.
double excess(const torch::Tensor& a, const torch::Tensor& b, double atol, double rtol);
// gtest assertion helper: "allclose(a, b, atol, rtol)" with a message naming `what` and the worst element.
::testing::AssertionResult all_close(const torch::Tensor& a, const torch::Tensor& b, double atol, double rtol,
                                     const std::string& what = "");

// While alive, files this process writes may not grow past `bytes` (RLIMIT_FSIZE; SIGXFSZ ignored, so a
// write past it fails with EFBIG like a full disk). ok() tells whether the limit was set.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(uint64_t bytes);
  ~FileSizeLimit();
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;
  bool ok() const { return ok_; }

 private:
  bool ok_ = false;
  uint64_t previous_cur_ = 0;
  void (*previous_handler_)(int) = nullptr;
};

}  // namespace lycoris::test
