// Thread-count guards: torch's intra-op threads of one thread, OpenBLAS's own pool.
#pragma once

namespace lycoris::exec {

// This thread's torch intra-op threads. With OpenMP that is the thread's own ICV: at::set_num_threads
// (torch 1.13) would also rebuild torch's pthreadpool (QNNPACK's), whose fresh threads spin for a while.
void set_intra_op_threads(int n);

// This thread's intra-op threads at `n` for the lifetime of a scope, the previous count restored after.
class IntraOpThreads {
 public:
  explicit IntraOpThreads(int n);
  ~IntraOpThreads();
  IntraOpThreads(const IntraOpThreads&) = delete;
  IntraOpThreads& operator=(const IntraOpThreads&) = delete;

 private:
  int previous_;
};

// OpenBLAS (the pthreads build torch links here) runs every sgemm on its own thread pool, whose idle
// threads spin in sched_yield against the tools' own workers (measured: a third of a merge's CPU time,
// 14 % of an extract's). The tools get their parallelism from row chunks or layers in flight, so BLAS
// runs in its caller's thread while they work; the previous setting comes back afterwards. Looked up at
// run time: a no-op with another BLAS.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  void (*set_)(int) = nullptr;
  int previous_ = 0;
};

}  // namespace lycoris::exec
