#include "lycoris/functional/factorization.hpp"

#include <algorithm>

namespace lycoris::functional {

std::pair<int64_t, int64_t> factorization(int64_t dim, int64_t factor) {
  if (factor > 0 && dim % factor == 0) {
    const int64_t m = factor, n = dim / factor;
    return {std::min(m, n), std::max(m, n)};
  }
  if (factor < 0) factor = dim;
  int64_t m = 1, n = dim;
  const int64_t length = m + n;  // not updated in the loop (as the reference): the check never fires
  while (m < n) {
    int64_t new_m = m + 1;
    while (dim % new_m != 0) ++new_m;
    const int64_t new_n = dim / new_m;
    if (new_m + new_n > length || new_m > factor) break;
    m = new_m;
    n = new_n;
  }
  return {std::min(m, n), std::max(m, n)};
}

std::optional<std::pair<int64_t, int64_t>> power2factorization(int64_t dim, int64_t factor) {
  if (factor == -1) factor = dim;
  int64_t m = 0, n = 0;
  while (m <= factor) {
    m += 2;
    while (dim % m != 0 && m < dim) m += 2;
    if (m > factor) break;
    const int64_t q = dim / m;
    if (q > 0 && (q & (q - 1)) == 0) n = q;
  }
  if (n == 0) return std::nullopt;
  return std::make_pair(dim / n, n);
}

}  // namespace lycoris::functional
