// The one pool of worker threads: chunked loops (the merge's rows) and ordered parallel maps (extract's
// layers), every worker running torch single-threaded.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

namespace lycoris::exec {

// Persistent workers (created on first use, for the life of the pool), each running torch single-threaded
// (intra-op threads 1, no grad) and taking tasks from a counter: no OpenMP barrier per loop, so a worker the
// OS preempts (2 cores shared with a reader, a writer and other processes) delays the loop by one task, not
// by a time slice of spinning. Persistent because a fresh thread pays torch's per-thread initialisation on
// its first op (in torch 1.13 a rebuild of its pthreadpool, whose new threads spin): with threads per tensor
// that was a third of a merge's CPU time.
// One job at a time: jobs of other threads wait their turn; a job started from inside a worker, or by the
// thread whose Job holds the pool, runs on that thread alone (no deadlock, no oversubscription).
class WorkerPool {
 public:
  using TaskFn = std::function<void(int64_t task, int worker)>;

  // The process's pool (never destroyed before exit).
  static WorkerPool& shared();
  WorkerPool() = default;
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // True on a pool worker thread while it runs a task.
  static bool on_worker();
  // True when a job started on this thread now would run on this thread alone (see above).
  bool nested() const;

  // fn(task, worker) for every task in [0, tasks) on `workers` threads, the caller being worker 0 (with
  // one intra-op thread meanwhile). The first exception stops the others (no new task starts) and is
  // rethrown.
  void run(int64_t tasks, int workers, const TaskFn& fn);

  // fn(task, worker) for every task in [0, tasks) on `workers` pool threads (workers 0 … workers − 1) while
  // the caller does something else; finish() or the destructor waits for them. The first exception stops
  // the others (no new task starts: every task before it has started) and is rethrown by finish().
  class Job {
   public:
    Job(WorkerPool& pool, int64_t tasks, int workers, TaskFn fn);
    ~Job();  // cancel() and finish(), the error dropped
    Job(const Job&) = delete;
    Job& operator=(const Job&) = delete;
    void cancel();  // no new task starts
    void finish();  // waits for the workers; rethrows the first error (once)

   private:
    std::exception_ptr release();  // waits for the workers, frees the pool; the first error
    WorkerPool& pool_;
    TaskFn fn_;
    std::unique_lock<std::mutex> turn_;
    bool finished_ = false;
  };

 private:
  // Under turn_mu_: wakes pool threads 1 … threads with fn(task, id − worker_base).
  void begin(int64_t tasks, int threads, int worker_base, const TaskFn* fn);
  // Waits for the pool threads of the job; its first error (or null).
  std::exception_ptr end();
  void loop(int id);
  void work(int id);

  std::mutex turn_mu_;
  mutable std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  const TaskFn* fn_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int threads_used_ = 0, worker_base_ = 0, active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::thread::id job_owner_;  // the thread whose Job holds the pool
  std::exception_ptr error_;
};

// An ordered parallel map on the shared pool: fn(i, worker) → R for i in [0, n) on `workers` threads
// (worker in [0, workers): index per-worker state with it), results taken in order on the caller while
// later ones are computed. A task's exception is rethrown by the take() of its index; tasks after a
// failed one do not start. Destroying the map early cancels what has not started and waits for the rest.
template <class R>
class OrderedMap {
 public:
  using Fn = std::function<R(size_t i, int worker)>;

  OrderedMap(size_t n, int workers, Fn fn)
      : results_(n), failures_(n), fn_(std::move(fn)) {
    if (WorkerPool::shared().nested()) return;  // computed by take() on this thread
    job_.emplace(WorkerPool::shared(), static_cast<int64_t>(n), workers, [this](int64_t i, int worker) {
      std::optional<R> r;
      std::exception_ptr failure;
      try {
        r.emplace(fn_(static_cast<size_t>(i), worker));
      } catch (...) {
        failure = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        results_[static_cast<size_t>(i)] = std::move(r);
        failures_[static_cast<size_t>(i)] = failure;
      }
      ready_.notify_all();
      if (failure) std::rethrow_exception(failure);  // stops the job
    });
  }
  ~OrderedMap() = default;  // job_ first: cancels and waits before the results go

  // Result i (waits for it), or its task's exception; i = 0, 1, … in order. After the last, the pool is free.
  R take(size_t i) {
    if (!job_) return fn_(i, 0);
    std::optional<R> r;
    {
      std::unique_lock<std::mutex> lock(mu_);
      ready_.wait(lock, [&] { return results_[i].has_value() || failures_[i]; });
      if (failures_[i]) std::rethrow_exception(failures_[i]);
      r = std::move(results_[i]);
      results_[i].reset();
    }
    if (i + 1 == results_.size()) job_.reset();
    return std::move(*r);
  }

 private:
  std::vector<std::optional<R>> results_;
  std::vector<std::exception_ptr> failures_;
  std::mutex mu_;
  std::condition_variable ready_;
  Fn fn_;
  std::optional<WorkerPool::Job> job_;  // last: destroyed first
};

}  // namespace lycoris::exec
