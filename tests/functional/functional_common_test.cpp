// functional/common: convert_into (F16C fp16 ↔ fp32) against torch's own conversion, including the
// special values; owned_float inside an OwnedFloatArena (values, independence from the source, tensors
// outliving the arena, overflow to ordinary allocations); map_populated blocks are usable and aligned.
#include <cstdint>
#include <limits>

#include "exec/arena.hpp"
#include "lycoris/functional/common.hpp"
#include "test_util.hpp"

namespace functional_common_test {

namespace F = lycoris::functional;
namespace exec = lycoris::exec;

torch::Tensor special_halves() {
  const float inf = std::numeric_limits<float>::infinity();
  auto specials = torch::tensor({0.f, -0.f, inf, -inf, std::nanf(""), 65504.f, -65504.f, 6.1e-5f, 6e-8f, 1e-8f, 70000.f});
  return torch::cat({specials, torch::randn({1003}) * 100}).to(torch::kFloat16);
}

TEST(FunctionalCommon, ConvertIntoMatchesTorch) {
  torch::manual_seed(5);
  auto h = special_halves();
  auto f = torch::empty(h.sizes(), torch::kFloat32);
  F::convert_into(f, h);
  auto expected = h.to(torch::kFloat32);
  EXPECT_TRUE(torch::equal(f.isnan(), expected.isnan()));
  EXPECT_TRUE(torch::equal(f.nan_to_num(0), expected.nan_to_num(0)));
  // fp32 → fp16: round to nearest even, overflow to inf, as torch
  auto x = torch::cat({torch::randn({2001}) * 1000, torch::tensor({65520.f, 65519.f, 1e-8f, 3e-8f, -0.f})});
  auto h2 = torch::empty(x.sizes(), torch::kFloat16);
  F::convert_into(h2, x);
  auto expected2 = x.to(torch::kFloat16);
  EXPECT_TRUE(torch::equal(h2.view(torch::kInt16), expected2.view(torch::kInt16)));
  // anything else: copy_
  auto d = torch::empty({3}, torch::kFloat64);
  F::convert_into(d, torch::tensor({1.f, 2.f, 3.f}));
  EXPECT_TRUE(torch::equal(d, torch::tensor({1., 2., 3.}, torch::kFloat64)));
}

TEST(FunctionalCommon, OwnedFloatArena) {
  torch::manual_seed(6);
  auto a = torch::randn({300, 7}).to(torch::kFloat16), b = torch::randn({5}, torch::kFloat64);
  auto big = torch::randn({1000});
  torch::Tensor ra, rb, rbig;
  {
    exec::OwnedFloatArena arena(exec::OwnedFloatArena::bytes_for(a.numel(), false) +
                             exec::OwnedFloatArena::bytes_for(b.numel(), true));
    ra = F::owned_float(a);
    rb = F::owned_float(b);
    rbig = F::owned_float(big);  // does not fit any more: an ordinary allocation
  }
  EXPECT_EQ(ra.scalar_type(), torch::kFloat32);
  EXPECT_EQ(rb.scalar_type(), torch::kFloat64);
  EXPECT_TRUE(torch::equal(ra, a.to(torch::kFloat32)));
  EXPECT_TRUE(torch::equal(rb, b));
  EXPECT_TRUE(torch::equal(rbig, big));
  EXPECT_NE(rb.data_ptr(), b.data_ptr());  // a copy, not a view
  EXPECT_EQ(reinterpret_cast<uintptr_t>(ra.data_ptr()) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(rb.data_ptr()) % 64, 0u);
  rb.add_(1);  // writable, independent of b
  EXPECT_TRUE(torch::equal(rb, b + 1));
  ra = torch::Tensor();  // the block stays alive for rb
  EXPECT_TRUE(torch::equal(rb, b + 1));
}

TEST(FunctionalCommon, MapPopulated) {
  size_t size = 0;
  void* p = exec::map_populated(3 << 20, size);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(size, size_t{4} << 20);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % (2 << 20), 0u);
  auto* bytes = static_cast<uint8_t*>(p);
  EXPECT_EQ(bytes[0], 0);
  EXPECT_EQ(bytes[size - 1], 0);
  bytes[size - 1] = 7;
  EXPECT_EQ(bytes[size - 1], 7);
  exec::unmap_populated(p, size);
}

}  // namespace functional_common_test
