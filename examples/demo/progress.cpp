// Progress bar on stderr: one redrawn line on a terminal, one summary line otherwise.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "demo.hpp"

namespace lycoris::demo {

namespace {

std::string format_seconds(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const auto t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(t / 3600),
                  static_cast<long long>(t / 60 % 60), static_cast<long long>(t % 60));
  else
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", static_cast<long long>(t / 60), static_cast<long long>(t % 60));
  return buf;
}

}  // namespace

Progress::Progress(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)),
      total_(total),
      enabled_(enabled),
      tty_(isatty(STDERR_FILENO) == 1),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {
  if (enabled_ && tty_) draw(false);
}

Progress::~Progress() {
  if (!finished_) finish();
}

void Progress::tick(int64_t n, const std::string& status) {
  done_ += n;
  if (!status.empty()) status_ = status;
  if (!enabled_ || !tty_) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ < std::chrono::milliseconds(100) && done_ < total_) return;
  last_draw_ = now;
  draw(false);
}

void Progress::finish(const std::string& status) {
  if (finished_) return;
  finished_ = true;
  if (!status.empty()) status_ = status;
  if (enabled_) draw(true);
}

void Progress::draw(bool final) {
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double frac = total_ > 0 ? std::min(1.0, static_cast<double>(done_) / static_cast<double>(total_)) : 1.0;
  const double rate = elapsed > 0 ? static_cast<double>(done_) / elapsed : 0;
  const double eta = rate > 0 ? static_cast<double>(total_ - done_) / rate : NAN;
  char line[512];
  if (final) {
    std::snprintf(line, sizeof line, "%-18s %lld/%lld in %s (%.1f/s) %s", label_.c_str(),
                  static_cast<long long>(done_), static_cast<long long>(total_), format_seconds(elapsed).c_str(),
                  rate, status_.c_str());
    std::fprintf(stderr, tty_ ? "\r%s\033[K\n" : "%s\n", line);
  } else {
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(static_cast<size_t>(filled), '#');
    bar.append(static_cast<size_t>(kWidth - filled), '.');
    std::snprintf(line, sizeof line, "%-18s [%s] %3.0f%% %lld/%lld %s<%s %s", label_.c_str(), bar.c_str(),
                  frac * 100, static_cast<long long>(done_), static_cast<long long>(total_),
                  format_seconds(elapsed).c_str(), format_seconds(eta).c_str(), status_.c_str());
    std::fprintf(stderr, "\r%s\033[K", line);
  }
  std::fflush(stderr);
}

}  // namespace lycoris::demo
