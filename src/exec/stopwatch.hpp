// Elapsed wall time from a start point (steady clock): the stage times of a tool's report.
#pragma once
#include <chrono>

namespace lycoris::exec {

class Stopwatch {
 public:
  Stopwatch() : t0_(std::chrono::steady_clock::now()) {}
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count(); }

 private:
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace lycoris::exec
