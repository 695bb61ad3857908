#include "lycoris/functional/svd.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/text.hpp"

namespace lycoris::functional {

namespace {

torch::Tensor as_compute(const torch::Tensor& M, const char* what) {
  if (!M.defined() || M.dim() != 2)
    throw ShapeError(std::string(what) + ": expected a 2-D matrix, got " +
                     (M.defined() ? shape_str(M.sizes()) : std::string("nothing")));
  return to_compute(M, M);
}

void check_rank(const torch::Tensor& M, int64_t k, const char* what) {
  const int64_t limit = std::min(M.size(0), M.size(1));
  if (k < 1 || k > limit)
    throw ShapeError(std::string(what) + ": rank " + std::to_string(k) + " is outside [1, " + std::to_string(limit) +
                     "] for a " + shape_str(M.sizes()) + " matrix");
}

torch::Tensor orthonormal_basis(const torch::Tensor& Y) { return std::get<0>(torch::linalg_qr(Y, "reduced")); }

}  // namespace

torch::Tensor SVD::reconstruct() const { return (U * S.unsqueeze(0)).matmul(Vh); }

namespace {
constexpr EnumName<SVDMethod> kSVDMethods[] = {
    {SVDMethod::Auto, "auto"}, {SVDMethod::Full, "full"}, {SVDMethod::Randomized, "randomized"}};
}  // namespace

SVDMethod parse_svd_method(const std::string& name) {
  SVDMethod m;
  std::string known;
  if (!parse_enum(kSVDMethods, name, m, &known))
    throw OptionError("svd method '" + escape_control(name) + "' is not one of " + known);
  return m;
}

const char* to_string(SVDMethod method) { return enum_name(kSVDMethods, method); }

SVD svd_full(const torch::Tensor& M) {
  auto m = as_compute(M, "svd_full");
  auto [U, S, Vh] = torch::linalg_svd(m, /*full_matrices=*/false);
  return {U, S, Vh};
}

torch::Tensor singular_values(const torch::Tensor& M) { return torch::linalg_svdvals(as_compute(M, "singular_values")); }

torch::Tensor singular_values_gram(const torch::Tensor& M) {
  auto m = as_compute(M, "singular_values_gram");
  if (m.size(0) > m.size(1)) m = m.t();  // wide: the Gram matrix of the rows is the small one
  const int64_t rows = m.size(0), cols = m.size(1);
  auto G = torch::zeros({rows, rows}, m.options().dtype(torch::kFloat64));
  const int64_t block = std::max<int64_t>(64, (int64_t{1} << 21) / std::max<int64_t>(rows, 1));
  for (int64_t c = 0; c < cols; c += block) {
    auto b = m.narrow(1, c, std::min(block, cols - c)).to(torch::kFloat64);
    G.addmm_(b, b.t());
  }
  // eigvalsh: ascending, tiny negative values are round-off of zeros
  return torch::linalg_eigvalsh(G).flip(0).clamp_min(0).sqrt().to(m.scalar_type());
}

SVD svd_randomized(const torch::Tensor& M, int64_t k, const RandomizedOptions& options) {
  auto m = as_compute(M, "svd_randomized");
  check_rank(m, k, "svd_randomized");
  const int64_t l = std::min(k + std::max<int64_t>(options.oversample, 0), std::min(m.size(0), m.size(1)));
  auto gen = at::detail::createCPUGenerator(options.seed);
  auto omega = torch::randn({m.size(1), l}, gen, torch::TensorOptions().dtype(m.scalar_type())).to(m.device());
  // range finder with power iterations: Q spans (M Mᵀ)^q M Ω
  auto Q = orthonormal_basis(m.matmul(omega));
  for (int64_t i = 0; i < options.power_iters; ++i) {
    auto Z = orthonormal_basis(m.t().matmul(Q));
    Q = orthonormal_basis(m.matmul(Z));
  }
  // exact SVD of the small projection B = Qᵀ M (l, n)
  auto [Ub, S, Vh] = torch::linalg_svd(Q.t().matmul(m), /*full_matrices=*/false);
  return truncate({Q.matmul(Ub), S, Vh}, k);
}

SVD svd_truncated(const torch::Tensor& M, int64_t k, SVDMethod method, const RandomizedOptions& options) {
  check_rank(M, k, "svd_truncated");
  if (method == SVDMethod::Auto)
    method = (k + options.oversample) * 4 <= std::min(M.size(0), M.size(1)) ? SVDMethod::Randomized : SVDMethod::Full;
  if (method == SVDMethod::Randomized) return svd_randomized(M, k, options);
  return truncate(svd_full(M), k);
}

SVD svd_product(const torch::Tensor& A, const torch::Tensor& B) {
  auto a = as_compute(A, "svd_product"), b = as_compute(B, "svd_product");
  if (a.size(1) != b.size(0))
    throw ShapeError("svd_product: inner sizes differ: " + shape_str(a.sizes()) + " · " + shape_str(b.sizes()));
  auto [Q1, R1] = torch::linalg_qr(a, "reduced");    // (m, t1), (t1, r)
  auto [Q2, R2] = torch::linalg_qr(b.t(), "reduced");  // (n, t2), (t2, r)
  auto [Uc, S, Vch] = torch::linalg_svd(R1.matmul(R2.t()), /*full_matrices=*/false);
  return {Q1.matmul(Uc), S, Vch.matmul(Q2.t())};
}

SVD truncate(const SVD& svd, int64_t k) {
  if (k < 0 || k > svd.rank())
    throw ShapeError("truncate: rank " + std::to_string(k) + " exceeds the " + std::to_string(svd.rank()) +
                     " singular triples available");
  return {svd.U.narrow(1, 0, k), svd.S.narrow(0, 0, k), svd.Vh.narrow(0, 0, k)};
}

double retained_energy(const torch::Tensor& S, int64_t k) {
  auto s2 = S.to(torch::kFloat64).square();
  const double total = s2.sum().item<double>();
  if (total <= 0) return 1.0;
  return s2.narrow(0, 0, std::min<int64_t>(k, S.size(0))).sum().item<double>() / total;
}

}  // namespace lycoris::functional
