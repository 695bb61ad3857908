#include "exec/stages.hpp"

namespace lycoris::exec {

Stages::~Stages() {
  // left without join() (an exception between spawn and join): stop the stages before waiting for them
  bool running = false;
  for (const auto& t : threads_) running = running || t.joinable();
  if (running && on_error_) on_error_();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

void Stages::spawn(std::function<void()> stage) {
  threads_.emplace_back([this, stage = std::move(stage)] { run(stage); });
}

void Stages::run(const std::function<void()>& stage) {
  try {
    stage();
  } catch (...) {
    fail(std::current_exception());
  }
}

void Stages::join() {
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  std::lock_guard<std::mutex> lock(mu_);
  if (error_) std::rethrow_exception(error_);
}

void Stages::fail(std::exception_ptr e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_) return;
    error_ = e;
  }
  if (on_error_) on_error_();
}

}  // namespace lycoris::exec
