// Internal to the tools: OpenBLAS at one thread for the lifetime of a scope.
#pragma once
#include <dlfcn.h>

namespace lycoris::tools {

// OpenBLAS (the pthreads build torch links here) runs every sgemm on its own thread pool, whose idle
// threads spin in sched_yield against the tools' own workers (measured: a third of a merge's CPU time,
// 14 % of an extract's). The tools get their parallelism from row chunks or layers in flight, so BLAS
// runs in its caller's thread while they work; the previous setting comes back afterwards. Looked up at
// run time: a no-op with another BLAS.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    set_ = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
    auto get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    if (!set_ || !get) return;
    previous_ = get();
    set_(1);
  }
  ~SingleThreadedBlas() {
    if (set_ && previous_ > 0) set_(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  void (*set_)(int) = nullptr;
  int previous_ = 0;
};

}  // namespace lycoris::tools
