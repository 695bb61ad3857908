// functional/factorization: the tables of docs/training.md#factorization (LoKr / GLoKr layouts) and
// docs/training.md#power2factorization (BOFT blocks).
#include <gtest/gtest.h>

#include <utility>

#include "lycoris/functional/factorization.hpp"

namespace factorization_test {

using namespace lycoris;
using P = std::pair<int64_t, int64_t>;

TEST(Factorization, Table) {
  using functional::factorization;
  EXPECT_EQ(factorization(64, -1), P(8, 8));
  EXPECT_EQ(factorization(360, 16), P(15, 24));
  EXPECT_EQ(factorization(320, 32), P(10, 32));
  EXPECT_EQ(factorization(10240, -1), P(80, 128));
  EXPECT_EQ(factorization(64, 64), P(1, 64));
  EXPECT_EQ(factorization(250, 8), P(5, 50));
  auto p = functional::power2factorization(320, 16);
  ASSERT_TRUE(p);
  EXPECT_EQ(*p, P(10, 32));
  EXPECT_FALSE(functional::power2factorization(320, 4));
  EXPECT_EQ(*functional::power2factorization(96, 8), P(6, 16));
}

}  // namespace factorization_test
