#include "exec/threads.hpp"

#include <dlfcn.h>

#include <string>

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include "lycoris/error.hpp"
#include "lycoris/threads.hpp"

namespace lycoris {

namespace {
// OpenBLAS's pool controls, looked up at run time: absent with another BLAS.
void (*openblas_set())(int) { return reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")); }
int (*openblas_get())() { return reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads")); }
}  // namespace

namespace exec {

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
  set_ = openblas_set();
  auto get = openblas_get();
  if (!set_ || !get) return;
  previous_ = get();
  set_(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  if (set_ && previous_ > 0) set_(previous_);
}

}  // namespace exec

void set_num_threads(int n) {
  if (n < 1) throw OptionError("set_num_threads: need at least 1 thread, got " + std::to_string(n));
  at::set_num_threads(n);
  if (auto set = openblas_set()) set(1);
}

int blas_pool_threads() {
  auto get = openblas_get();
  return get ? get() : 0;
}

}  // namespace lycoris
