// The factorisation helpers of the reference (docs/training.md#factorization), used to choose layouts when CREATING
// adapters (LoKr splits, Diag-OFT and BOFT blocks). Never used to read files: layouts come from shapes.
#pragma once
#include <cstdint>
#include <optional>
#include <utility>

namespace lycoris::functional {

// (m, n) with m ≤ n, m·n = dim (docs/training.md#factorization). factor > 0 dividing dim wins immediately; factor < 0
// means no bound; otherwise walk the divisors upward while the smaller one stays ≤ factor.
std::pair<int64_t, int64_t> factorization(int64_t dim, int64_t factor = -1);

// (dim / n, n) for the largest even divisor m ≤ factor of dim with n = dim / m a power of two
// (docs/training.md#power2factorization); nullopt when there is none (the reference returns (None, 0)). factor = -1 means
// no bound; any other negative factor finds nothing.
std::optional<std::pair<int64_t, int64_t>> power2factorization(int64_t dim, int64_t factor = -1);

}  // namespace lycoris::functional
