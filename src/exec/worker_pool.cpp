#include "exec/worker_pool.hpp"

#include <torch/torch.h>

#include <algorithm>

#include "exec/threads.hpp"

namespace lycoris::exec {

namespace {
thread_local bool pool_worker = false;  // this thread runs a task of a pool
}  // namespace

WorkerPool& WorkerPool::shared() {
  static WorkerPool pool;
  return pool;
}

bool WorkerPool::on_worker() { return pool_worker; }

bool WorkerPool::nested() const {
  if (pool_worker) return true;
  std::lock_guard<std::mutex> lock(mu_);
  return job_owner_ == std::this_thread::get_id();
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void WorkerPool::run(int64_t tasks, int workers, const TaskFn& fn) {
  if (nested()) {  // this thread does it all
    for (int64_t c = 0; c < tasks; ++c) fn(c, 0);
    return;
  }
  std::lock_guard<std::mutex> turn(turn_mu_);
  begin(tasks, workers - 1, 0, &fn);
  {
    IntraOpThreads one(1);
    pool_worker = true;
    work(0);
    pool_worker = false;
  }
  if (auto e = end()) std::rethrow_exception(e);
}

WorkerPool::Job::Job(WorkerPool& pool, int64_t tasks, int workers, TaskFn fn)
    : pool_(pool), fn_(std::move(fn)), turn_(pool.turn_mu_) {
  pool_.begin(tasks, static_cast<int>(std::clamp<int64_t>(workers, 1, std::max<int64_t>(tasks, 1))), 1, &fn_);
  std::lock_guard<std::mutex> lock(pool_.mu_);
  pool_.job_owner_ = std::this_thread::get_id();
}

WorkerPool::Job::~Job() {
  cancel();
  if (!finished_) release();
}

void WorkerPool::Job::cancel() { pool_.next_ = pool_.tasks_; }

void WorkerPool::Job::finish() {
  if (finished_) return;
  finished_ = true;
  if (auto e = release()) std::rethrow_exception(e);
}

std::exception_ptr WorkerPool::Job::release() {
  auto e = pool_.end();
  {
    std::lock_guard<std::mutex> lock(pool_.mu_);
    pool_.job_owner_ = std::thread::id();
  }
  turn_.unlock();
  return e;
}

void WorkerPool::begin(int64_t tasks, int threads, int worker_base, const TaskFn* fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (static_cast<int>(threads_.size()) < threads) {
      const int id = static_cast<int>(threads_.size()) + 1;
      threads_.emplace_back([this, id] { loop(id); });
    }
    fn_ = fn;
    tasks_ = tasks;
    next_ = 0;
    threads_used_ = std::max(threads, 0);
    worker_base_ = worker_base;
    active_ = threads_used_;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
}

std::exception_ptr WorkerPool::end() {
  std::unique_lock<std::mutex> lock(mu_);
  done_.wait(lock, [&] { return active_ == 0; });
  fn_ = nullptr;
  return std::exchange(error_, nullptr);
}

void WorkerPool::loop(int id) {
  set_intra_op_threads(1);
  c10::GradMode::set_enabled(false);
  pool_worker = true;
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (id > threads_used_) continue;
    }
    work(id);
    std::lock_guard<std::mutex> lock(mu_);
    if (--active_ == 0) done_.notify_all();
  }
}

void WorkerPool::work(int id) {
  try {
    torch::NoGradGuard no_grad;
    for (int64_t c; (c = next_++) < tasks_;) (*fn_)(c, id - worker_base_);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_) error_ = std::current_exception();
    next_ = tasks_;
  }
}

}  // namespace lycoris::exec
