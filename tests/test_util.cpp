#include "test_util.hpp"

#include <atomic>
#include <filesystem>
#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
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

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

size_t count_lines(const std::string& text) {
  size_t n = 0;
  for (char ch : text) n += ch == '\n';
  if (!text.empty() && text.back() != '\n') ++n;
  return n;
}

std::vector<std::string> listing(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

CliProcess::CliProcess(const std::vector<std::string>& args, const CliOptions& options)
    : dir_(temp_dir("cli")), timeout_(options.timeout_seconds) {
  // everything the child needs is prepared before fork: between fork and exec only system calls
  // LYCORIS_TEST_CLI runs the tests against another build of the CLI (e.g. an older one, to see them fail)
  const char* other = std::getenv("LYCORIS_TEST_CLI");
  const std::string exe = !options.program.empty() ? options.program : other ? other : LYCORIS_CLI, out = dir_ + "/stdout", err = dir_ + "/stderr";
  std::vector<std::string> argv_s{exe};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) env_s.emplace_back(*e);
  env_s.insert(env_s.end(), options.env.begin(), options.env.end());
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  const uint64_t fsize = options.file_size_limit;

  pid_ = fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    for (int sig = 1; sig < NSIG; ++sig)
      if (sig != SIGKILL && sig != SIGSTOP) ::signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    if (fsize) {
      struct rlimit limit {};
      getrlimit(RLIMIT_FSIZE, &limit);
      limit.rlim_cur = fsize;
      setrlimit(RLIMIT_FSIZE, &limit);
    }
    const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0) _exit(127);
    dup2(o, 1);
    dup2(e, 2);
    execve(exe.c_str(), argv.data(), envp.data());
    _exit(127);
  }
}

CliProcess::~CliProcess() {
  if (!reaped_ && pid_ > 0) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
  }
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

bool CliProcess::wait_for_stderr(const std::string& text, double seconds) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < end) {
    if (slurp(dir_ + "/stderr").find(text) != std::string::npos) return true;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG | WNOWAIT) == pid_) return false;  // exited (not reaped yet)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

void CliProcess::send(int sig) { ::kill(pid_, sig); }

CliResult CliProcess::wait() {
  CliResult r;
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_);
  int status = 0;
  for (;;) {
    const pid_t done = waitpid(pid_, &status, WNOHANG);
    if (done == pid_) break;
    if (std::chrono::steady_clock::now() > end) {
      r.timed_out = true;
      ::kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  reaped_ = true;
  if (WIFEXITED(status)) r.code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  r.out = slurp(dir_ + "/stdout");
  r.err = slurp(dir_ + "/stderr");
  return r;
}

CliResult run_cli(const std::vector<std::string>& args, const CliOptions& options) {
  CliProcess p(args, options);
  return p.wait();
}

std::vector<std::string> with_words(std::vector<std::string> head, const std::string& tail) {
  std::istringstream words(tail);
  for (std::string w; words >> w;) head.push_back(w);
  return head;
}

}  // namespace lycoris::test
