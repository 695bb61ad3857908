// The c10d objects behind lycoris::distributed::ProcessGroup (private: the public header needs neither c10d's
// nor Gloo's headers). Compiled with USE_C10D_GLOO (and USE_C10D_NCCL where libtorch has CUDA), set by CMake.
#pragma once
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <exception>
#include <functional>
#include <string>

#include "lycoris/distributed.hpp"

namespace lycoris::distributed {

struct ProcessGroup::Impl {
  Options options;
  std::string backend;
  torch::Device device = torch::kCPU;
  std::chrono::milliseconds timeout{0};
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> group;

  // Starts a collective; an exception becomes fail(what, …).
  c10::intrusive_ptr<c10d::Work> start(const std::string& what,
                                       const std::function<c10::intrusive_ptr<c10d::Work>()>& launch);
  // Waits for `work` (at most the timeout); a failure becomes fail(what, …).
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what);
  // "distributed: <what> failed on rank r of n: <reason>; <ranks that did not answer>" as a DistributedError.
  [[noreturn]] void fail(const std::string& what, const std::exception& e);
  // After a failure: which other ranks do not check in through the store within a short grace period.
  std::string unresponsive_ranks();
};

// An exception's message without c10's C++ backtrace.
std::string reason_of(const std::exception& e);

}  // namespace lycoris::distributed
