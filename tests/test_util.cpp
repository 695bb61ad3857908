#include "test_util.hpp"

#include <atomic>
#include <filesystem>
#include <sstream>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

namespace lycoris::test {

std::string data_path(const std::string& relative) { return std::string(LYCORIS_TEST_DATA) + "/" + relative; }

std::string temp_dir(const std::string& tag) {
  static std::atomic<int> counter{0};
  auto dir = std::filesystem::temp_directory_path() /
             ("lycoris-test-" + tag + "-" + std::to_string(getpid()) + "-" + std::to_string(counter++));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

double excess(const torch::Tensor& a, const torch::Tensor& b, double atol, double rtol) {
  auto a64 = a.to(torch::kCPU, torch::kFloat64), b64 = b.to(torch::kCPU, torch::kFloat64);
  if (a64.numel() == 0) return -1;
  return ((a64 - b64).abs() - (atol + rtol * b64.abs())).max().item<double>();
}

::testing::AssertionResult all_close(const torch::Tensor& a, const torch::Tensor& b, double atol, double rtol,
                                     const std::string& what) {
  if (!a.defined() || !b.defined()) return ::testing::AssertionFailure() << what << ": undefined tensor";
  if (a.sizes() != b.sizes())
    return ::testing::AssertionFailure() << what << ": shape " << a.sizes() << " vs expected " << b.sizes();
  auto a64 = a.to(torch::kCPU, torch::kFloat64), b64 = b.to(torch::kCPU, torch::kFloat64);
  auto bad_finite = (a64.isfinite() != b64.isfinite()).any().item<bool>();
  if (bad_finite) return ::testing::AssertionFailure() << what << ": non-finite values differ";
  double e = excess(a64.nan_to_num(0), b64.nan_to_num(0), atol, rtol);
  if (e <= 0) return ::testing::AssertionSuccess();
  auto diff = (a64 - b64).abs();
  auto idx = diff.flatten().argmax().item<int64_t>();
  std::ostringstream os;
  os << what << ": not close (atol " << atol << ", rtol " << rtol << "): max |diff| " << diff.max().item<double>()
     << " at flat index " << idx << " (got " << a64.flatten()[idx].item<double>() << ", expected "
     << b64.flatten()[idx].item<double>() << ")";
  return ::testing::AssertionFailure() << os.str();
}

FileSizeLimit::FileSizeLimit(uint64_t bytes) {
  previous_handler_ = signal(SIGXFSZ, SIG_IGN);
  struct rlimit limit {};
  getrlimit(RLIMIT_FSIZE, &limit);
  previous_cur_ = limit.rlim_cur;
  limit.rlim_cur = bytes;
  ok_ = setrlimit(RLIMIT_FSIZE, &limit) == 0;
}

FileSizeLimit::~FileSizeLimit() {
  struct rlimit limit {};
  getrlimit(RLIMIT_FSIZE, &limit);
  limit.rlim_cur = previous_cur_;
  setrlimit(RLIMIT_FSIZE, &limit);
  signal(SIGXFSZ, previous_handler_);
}

}  // namespace lycoris::test
