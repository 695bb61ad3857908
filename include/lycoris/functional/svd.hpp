// Truncated SVDs for the adapter tools (extract, resize): one home for every SVD they run.
//
//   full         thin LAPACK SVD of M, then the first k triples (Eckart–Young optimum, cost O(m·n·min(m,n))).
//   randomized   Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1: a Gaussian sketch Y = M·Ω with k + p columns,
//                q power iterations (re-orthonormalised by QR each half step, so round-off does not wipe out
//                the small directions), Q = qr(Y), then the exact SVD of the small B = Qᵀ·M.
//                Cost O(m·n·(k+p)·(2q+2)). Error ≤ (1 + small) × the optimum when σ decays; seeded, so
//                results are reproducible.
//   product      the SVD of A·B without forming it (A (m, r), B (r, n)): A = Q₁R₁, Bᵀ = Q₂R₂,
//                A·B = Q₁ (R₁R₂ᵀ) Q₂ᵀ and only the small r×r core is decomposed. Exact; used by resize.
// All functions take a 2-D matrix on any device; math in fp32 (fp64 if M is fp64); results on M's device.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <string>

namespace lycoris::functional {

// M ≈ U · diag(S) · Vh with U (m, k), S (k) descending, Vh (k, n).
struct SVD {
  torch::Tensor U, S, Vh;
  int64_t rank() const { return S.defined() ? S.size(0) : 0; }
  // U · diag(S) · Vh (m, n).
  torch::Tensor reconstruct() const;
};

enum class SVDMethod { Auto, Full, Randomized };
// "auto" | "full" | "randomized" (OptionError otherwise).
SVDMethod parse_svd_method(const std::string& name);
const char* to_string(SVDMethod method);

struct RandomizedOptions {
  int64_t oversample = 8;   // p: extra sketch columns
  int64_t power_iters = 2;  // q
  uint64_t seed = 0x5eed;   // Ω is drawn from this seed on the CPU, then moved to M's device
};

// Thin SVD of the whole matrix: every min(m, n) triple.
SVD svd_full(const torch::Tensor& M);
// The singular values only (cheaper than svd_full: no U, V), descending.
torch::Tensor singular_values(const torch::Tensor& M);
// The singular values (descending, M's compute dtype) as the square roots of the eigenvalues of the fp64 Gram
// matrix of the smaller side, G = Σ_blocks M_b·M_bᵀ accumulated over ~16 MB column blocks (no fp64 copy of M):
// min(m,n)²·max(m,n) multiply-adds in one BLAS-3 pass plus a min(m,n)² eigenproblem — several times faster
// than the bidiagonalisation of a wide matrix. Absolute error ≈ 1e-8·σ_1 (fp64 round-off of σ²), below the
// error of an fp32 SVD of M for every σ_i the rank rules can tell apart.
torch::Tensor singular_values_gram(const torch::Tensor& M);
// Top-k triples by the randomized range finder. ShapeError unless 1 ≤ k ≤ min(m, n).
SVD svd_randomized(const torch::Tensor& M, int64_t k, const RandomizedOptions& options = {});
// Auto: randomized when the sketch is small against the matrix (k + p ≤ min(m, n) / 4), otherwise the
// full SVD truncated to k. ShapeError unless 1 ≤ k ≤ min(m, n).
SVD svd_truncated(const torch::Tensor& M, int64_t k, SVDMethod method = SVDMethod::Auto,
                  const RandomizedOptions& options = {});
// Exact SVD of A·B (A (m, r), B (r, n)) through QR of the factors; rank ≤ min(m, r, n) triples.
SVD svd_product(const torch::Tensor& A, const torch::Tensor& B);

// The first k triples of an SVD (k ≤ svd.rank()).
SVD truncate(const SVD& svd, int64_t k);
// Fraction of Σσ² kept by the first k values of S (1 when S is all zero).
double retained_energy(const torch::Tensor& S, int64_t k);

}  // namespace lycoris::functional
