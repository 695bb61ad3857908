// Shared test helpers.
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

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

// ---- the `lycoris` CLI as a child process (the real binary: exit codes, signals, limits)

struct CliResult {
  int code = -1;       // exit status; -1 when ended by a signal
  int signal = 0;      // the signal that ended it, 0 if it exited
  bool timed_out = false;
  std::string out, err;
};

struct CliOptions {
  std::vector<std::string> env;  // "NAME=value" added to the child's environment
  uint64_t file_size_limit = 0;  // RLIMIT_FSIZE of the child (0: unchanged)
  double timeout_seconds = 120;  // then the child is killed and timed_out set
  std::string program;           // another program to run instead of the CLI (a test worker)
};

// The child starts with every signal at its default disposition and none blocked, whatever this process
// does with them (ignored signals would be inherited through exec and hide the CLI's own handling).
class CliProcess {
 public:
  explicit CliProcess(const std::vector<std::string>& args, const CliOptions& options = {});
  ~CliProcess();  // kills and reaps the child if still running
  CliProcess(const CliProcess&) = delete;
  CliProcess& operator=(const CliProcess&) = delete;

  int pid() const { return pid_; }
  // Waits until the child's stderr contains `text` (true), or it exits or `seconds` pass (false).
  bool wait_for_stderr(const std::string& text, double seconds);
  void send(int sig);
  CliResult wait();

 private:
  int pid_ = -1;
  std::string dir_;
  double timeout_;
  bool reaped_ = false;
};

// Runs `lycoris args...` to the end.
CliResult run_cli(const std::vector<std::string>& args, const CliOptions& options = {});
// `head` followed by the words of `tail`, split at spaces (options written as one string: "--dim 2 --ratio 0.5";
// no quoting).
std::vector<std::string> with_words(std::vector<std::string> head, const std::string& tail);

// The whole content of a file ("" if it cannot be read).
std::string slurp(const std::string& path);
// Lines in a text (a last line without '\n' counts).
size_t count_lines(const std::string& text);
// The names in a directory, sorted.
std::vector<std::string> listing(const std::string& dir);

}  // namespace lycoris::test
