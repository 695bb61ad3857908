// The CPU threads of training and inference with libtorch (docs/training.md#threads).
#pragma once

namespace lycoris {

// torch's intra-op threads ← n (as torch::set_num_threads), and a BLAS that keeps a thread pool of its own
// (the pthreads OpenBLAS that Debian's libtorch links) computes each product in the torch thread that asks
// for it. Otherwise that pool, sized to every core, runs on top of torch's n threads and the two spin
// against each other: measured on 2 cores, a training step at n = 2 took 2.3–2.8× as long as with this
// (docs/training.md#threads). With another BLAS this is torch::set_num_threads(n). n ≥ 1.
void set_num_threads(int n);

// The BLAS's own pool size (OpenBLAS), or 0 when the BLAS has none this can see.
int blas_pool_threads();

}  // namespace lycoris
