#include "exec/threads.hpp"

#include <dlfcn.h>

#include <ATen/Config.h>
#include <ATen/Parallel.h>

namespace lycoris::exec {

void set_intra_op_threads(int n) {
#if AT_PARALLEL_OPENMP
  static const auto omp = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  if (omp) {
    at::get_num_threads();  // torch's per-thread initialisation first: it would reset the ICV later
    omp(n);
    return;
  }
#endif
  at::set_num_threads(n);
}

IntraOpThreads::IntraOpThreads(int n) : previous_(at::get_num_threads()) { set_intra_op_threads(n); }

IntraOpThreads::~IntraOpThreads() { set_intra_op_threads(previous_); }

SingleThreadedBlas::SingleThreadedBlas() {
  set_ = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  auto get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  if (!set_ || !get) return;
  previous_ = get();
  set_(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  if (set_ && previous_ > 0) set_(previous_);
}

}  // namespace lycoris::exec
