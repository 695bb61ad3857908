// exec/: the worker pool (chunked runs, ordered maps, errors, nesting) and pipeline stages.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "exec/bounded_queue.hpp"
#include "exec/stages.hpp"
#include "exec/worker_pool.hpp"

namespace exec_test {

namespace exec = lycoris::exec;

TEST(ExecWorkerPool, RunCoversEveryTaskOnceAndRethrows) {
  std::vector<std::atomic<int>> seen(1000);
  exec::WorkerPool::shared().run(1000, 3, [&](int64_t c, int worker) {
    EXPECT_GE(worker, 0);
    EXPECT_LT(worker, 3);
    ++seen[static_cast<size_t>(c)];
  });
  for (const auto& s : seen) EXPECT_EQ(s.load(), 1);
  EXPECT_THROW(exec::WorkerPool::shared().run(100, 2,
                                              [&](int64_t c, int) {
                                                if (c == 7) throw std::runtime_error("task 7");
                                              }),
               std::runtime_error);
  // usable again after an error; a run nested in a task runs on that worker
  std::atomic<int> inner{0};
  exec::WorkerPool::shared().run(4, 2, [&](int64_t, int) {
    exec::WorkerPool::shared().run(3, 2, [&](int64_t, int worker) {
      EXPECT_EQ(worker, 0);
      ++inner;
    });
  });
  EXPECT_EQ(inner.load(), 12);
}

TEST(ExecOrderedMap, ResultsInOrderErrorsAtTheirIndex) {
  std::vector<int> per_worker(3, 0);
  {
    exec::OrderedMap<std::string> m(50, 3, [&](size_t i, int worker) {
      ++per_worker[static_cast<size_t>(worker)];  // one worker per index of per-worker state
      return std::to_string(i * i);
    });
    for (size_t i = 0; i < 50; ++i) EXPECT_EQ(m.take(i), std::to_string(i * i));
  }
  int total = 0;
  for (int n : per_worker) total += n;
  EXPECT_EQ(total, 50);

  std::atomic<int> started{0};
  {
    exec::OrderedMap<int> failing(100, 2, [&](size_t i, int) {
      ++started;
      if (i == 5) throw std::invalid_argument("layer 5");
      // later tasks take a while: instant ones could all run on the other worker before the failure reached
      // the pool's cancel (a race that failed about every other run of this test alone)
      if (i > 5) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      return static_cast<int>(i);
    });
    for (size_t i = 0; i < 5; ++i) EXPECT_EQ(failing.take(i), static_cast<int>(i));
    try {
      failing.take(5);
      FAIL() << "no error at index 5";
    } catch (const std::invalid_argument& e) {
      EXPECT_STREQ(e.what(), "layer 5");
    }
  }  // destroyed with the pool still busy: cancels and waits
  EXPECT_LT(started.load(), 100) << "tasks after the failed one went on";

  // a map whose caller runs a pool job meanwhile: that job runs on the caller (no deadlock)
  exec::OrderedMap<int> busy(4, 2, [](size_t i, int) { return static_cast<int>(i); });
  std::atomic<int> ran{0};
  exec::WorkerPool::shared().run(3, 2, [&](int64_t, int) { ++ran; });
  EXPECT_EQ(ran.load(), 3);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(busy.take(i), static_cast<int>(i));
}

TEST(ExecStages, FirstErrorAbortsTheOthers) {
  exec::BoundedQueue<int> q(2);
  exec::Stages stages([&] { q.abort(); });
  std::atomic<bool> consumer_done{false};
  stages.spawn([&] {
    int v;
    while (q.pop(v)) {
    }
    consumer_done = true;
  });
  stages.run([&] {
    q.push(1);
    throw std::runtime_error("producer failed");
  });
  EXPECT_THROW(stages.join(), std::runtime_error);
  EXPECT_TRUE(consumer_done.load());
}

}  // namespace exec_test
