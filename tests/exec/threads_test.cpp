// lycoris::set_num_threads (lycoris/threads.hpp): torch's intra-op threads as asked, and OpenBLAS's own pool
// (when this libtorch's BLAS is the pthreads OpenBLAS) down to one, so that it never runs on top of them.
#include <dlfcn.h>

#include "lycoris/error.hpp"
#include "lycoris/threads.hpp"
#include "test_util.hpp"

namespace threads_test {

TEST(Threads, SetsTorchsThreadsAndRunsBlasInThem) {
  const int torch_before = torch::get_num_threads();
  auto set_pool = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  const int pool_before = lycoris::blas_pool_threads();
  if (set_pool) {
    set_pool(2);  // the pool OpenBLAS starts with on a machine of two cores or more
    EXPECT_EQ(lycoris::blas_pool_threads(), 2);
  } else {
    EXPECT_EQ(pool_before, 0) << "no OpenBLAS: no pool to see";
  }
  lycoris::set_num_threads(2);
  EXPECT_EQ(torch::get_num_threads(), 2);
  if (set_pool) EXPECT_EQ(lycoris::blas_pool_threads(), 1);
  // a product computed with the pool at one thread is the same product
  torch::manual_seed(1);
  const auto a = torch::randn({64, 48}, torch::kFloat64), b = torch::randn({48, 32}, torch::kFloat64);
  EXPECT_TRUE(lycoris::test::all_close(a.mm(b), (a.unsqueeze(2) * b.unsqueeze(0)).sum(1), 1e-12, 1e-12));
  EXPECT_THROW(lycoris::set_num_threads(0), lycoris::OptionError);
  torch::set_num_threads(torch_before);
  if (set_pool && pool_before > 0) set_pool(pool_before);
}

}  // namespace threads_test
