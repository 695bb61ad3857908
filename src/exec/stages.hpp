// The threads of a pipeline (read → compute → write): the first stage to fail stops the others.
#pragma once
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lycoris::exec {

// Runs stages, each on its own thread (spawn) or on the caller (run). The first exception of any stage is
// kept and `on_error` is called once, to abort what the other stages wait on (their queues); join() waits
// for every spawned stage and rethrows that first exception. The destructor joins too (the error dropped),
// after calling `on_error` when stages are still running.
class Stages {
 public:
  explicit Stages(std::function<void()> on_error = {}) : on_error_(std::move(on_error)) {}
  ~Stages();
  Stages(const Stages&) = delete;
  Stages& operator=(const Stages&) = delete;

  void spawn(std::function<void()> stage);
  void run(const std::function<void()>& stage);
  void join();

 private:
  void fail(std::exception_ptr e);

  std::function<void()> on_error_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::exception_ptr error_;
};

}  // namespace lycoris::exec
