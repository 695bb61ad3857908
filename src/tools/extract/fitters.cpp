// Extract's layer fits: SVD, alternating least squares, nearest Kronecker product (see fitters.hpp).
#include "tools/extract/fitters.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/factorization.hpp"
#include "lycoris/functional/svd.hpp"

namespace lycoris::tools {

namespace F = functional;

namespace {

std::vector<int64_t> kernel_of(const torch::Tensor& D) { return D.sizes().slice(2).vec(); }

int64_t numel_of(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (auto d : dims) n *= d;
  return n;
}

// (O, r) for Linear, (O, r, 1, …) for convs.
torch::Tensor up_shaped(const torch::Tensor& up2d, const torch::Tensor& D) {
  std::vector<int64_t> shape{up2d.size(0), up2d.size(1)};
  shape.resize(static_cast<size_t>(D.dim()), 1);
  return up2d.reshape(shape);
}

torch::Tensor with_kernel(const torch::Tensor& t2d, int64_t rows, int64_t cols, const std::vector<int64_t>& kernel) {
  std::vector<int64_t> shape{rows, cols};
  shape.insert(shape.end(), kernel.begin(), kernel.end());
  return t2d.reshape(shape);
}

void check_fit_rank(int64_t rank, int64_t limit, const torch::Tensor& D, const char* algo, const char* what) {
  if (rank < 1 || rank > limit)
    throw ShapeError(std::string(algo) + ": rank " + std::to_string(rank) + " is outside [1, " +
                     std::to_string(limit) + "] (" + what + ") for a layer of shape " + F::shape_str(D.sizes()));
}

// Extract's alpha: r in D's compute dtype, as the reference's shape-(1,) tensor for LoCon (so s = 1).
torch::Tensor rank_alpha(int64_t r, const torch::Tensor& like, bool one_dim) {
  auto t = torch::full({}, static_cast<double>(r), like.options());
  return one_dim ? t.reshape({1}) : t;
}

// numpy.quantile(x, q) with linear interpolation, by two selections instead of a sort.
torch::Tensor linear_quantile(const torch::Tensor& x, double q) {
  auto flat = x.flatten();
  const int64_t n = flat.numel();
  const double h = static_cast<double>(n - 1) * q;
  const int64_t lo = static_cast<int64_t>(std::floor(h));
  const double frac = h - static_cast<double>(lo);
  auto v_lo = std::get<0>(torch::kthvalue(flat, lo + 1));
  if (frac == 0 || lo + 1 >= n) return v_lo;
  auto v_hi = std::get<0>(torch::kthvalue(flat, lo + 2));
  return v_lo + (v_hi - v_lo) * frac;
}

// Sparse residual (docs/format.md#sparse-bias): entries with |E| ≥ the sparsity quantile of |E|, as COO.
void set_sparse_residual(LoConFactors& f, const torch::Tensor& E, double sparsity) {
  auto abs = E.abs();
  auto mask = (abs >= linear_quantile(abs, sparsity)) & (E != 0);
  auto idx = torch::nonzero(mask).t();  // (2, nnz), row-major order like coalesce()
  const bool fits16 = std::max(E.size(0), E.size(1)) <= 32767;
  if (!fits16)
    f.note += (f.note.empty() ? "" : "; ") + std::string("sparse-bias indices stored as int32 (dims > 32767)");
  const auto itype = fits16 ? torch::kInt16 : torch::kInt32;
  f.bias_indices = idx.to(itype);
  f.bias_values = E.masked_select(mask);
  f.bias_size = torch::tensor({E.size(0), E.size(1)}, torch::TensorOptions().dtype(itype)).to(E.device());
}

torch::Tensor rms(const torch::Tensor& t) { return t.square().mean().sqrt(); }

// Row-wise Khatri–Rao square of X (R, s): K[o, (i, j)] = X[o, i]·X[o, j] (R, s²).
torch::Tensor row_kr(const torch::Tensor& X) {
  return (X.unsqueeze(2) * X.unsqueeze(1)).reshape({X.size(0), X.size(1) * X.size(1)});
}
// ALS half-step: the A (R, r) minimising ‖M − (A·B) ⊙ P‖ row by row, P = Pa·Pb (R, C) the other Hadamard
// factor: row o solves G_o a = Σ_n M[o,n] P[o,n] B[:,n] with G_o = Σ_n P[o,n]² B[:,n]B[:,n]ᵀ, ridge-regularised.
// G (R, r²) is formed the cheaper of two exact ways: P²·(B ⊙ B)ᵀ directly (R·C·r² multiply-adds), or through
// P[o,n]² = Σ_ij Pa[o,i]Pa[o,j]·Pb[i,n]Pb[j,n]: G = (Pa ⊙ Pa)·[(Pb ⊙ Pb)·(B ⊙ B)ᵀ] ((R + C)·s²·r², in fp64
// because the expanded square can cancel) — 4–5× fewer operations on the large SD layers.
torch::Tensor als_rows(const torch::Tensor& M, const torch::Tensor& B, const torch::Tensor& P, const torch::Tensor& Pa,
                       const torch::Tensor& Pb) {
  const int64_t R = M.size(0), C = M.size(1), r = B.size(0), s = Pa.size(1);
  auto BB = row_kr(B.t());  // (C, r²)
  torch::Tensor G;
  if (2.0 * static_cast<double>((R + C) * s * s) < static_cast<double>(R * C)) {
    const auto f64 = torch::kFloat64;
    auto mid = row_kr(Pb.t().to(f64)).t().matmul(BB.to(f64));  // (s², r²)
    G = row_kr(Pa.to(f64)).matmul(mid).to(M.scalar_type());
  } else {
    G = P.square().matmul(BB);
  }
  G = G.reshape({R, r, r});
  auto rhs = (M * P).matmul(B.t());
  auto diag = G.diagonal(0, 1, 2);
  auto lam = diag.mean(-1, true) * 1e-6 + 1e-20;
  G = G + torch::diag_embed(lam.expand({R, r}));
  return torch::linalg_solve(G, rhs.unsqueeze(-1)).squeeze(-1);
}

// Per rank-1 term: equal norms of the column of A and the row of B (better fp16 range, same product).
void balance_terms(torch::Tensor& A, torch::Tensor& B) {
  auto na = A.norm(2, {0}), nb = B.norm(2, {1});
  auto ok = (na > 0) & (nb > 0);
  auto f = torch::where(ok, (nb / torch::where(ok, na, torch::ones_like(na))).sqrt(), torch::ones_like(na));
  A = A * f.unsqueeze(0);
  B = B / f.unsqueeze(1);
}


}  // namespace

void check_fit_input(const torch::Tensor& D, const char* algo) {
  if (!D.defined() || D.dim() < 2 || D.dim() > 5)
    throw ShapeError(std::string(algo) + ": expected a Linear or Conv1d/2d/3d weight difference, got shape " +
                     (D.defined() ? F::shape_str(D.sizes()) : std::string("nothing")));
}

// ---------------------------------------------------------------- the Kronecker split

KronSplit kron_split(const torch::Tensor& D, int64_t factor) {
  auto [a, p] = F::factorization(D.size(0), factor);
  auto [c, q] = F::factorization(D.size(1), factor);
  return {a, p, c, q};
}

bool lokr_stores_full_w2(const KronSplit& s, int64_t rank) {
  return static_cast<double>(rank) >= static_cast<double>(std::max(s.p, s.q)) / 2.0;
}

torch::Tensor kron_rearrange(const torch::Tensor& D, const KronSplit& s) {
  const int64_t k = numel_of(kernel_of(D));
  return D.reshape({s.a, s.p, s.c, s.q, k}).permute({0, 2, 1, 3, 4}).reshape({s.a * s.c, s.p * s.q * k});
}

std::pair<torch::Tensor, torch::Tensor> nearest_kronecker(const torch::Tensor& R, const ExtractOptions& o) {
  auto top = F::svd_truncated(R, 1, o.svd, o.randomized);
  auto root = top.S.index({0}).sqrt();
  return {top.U.select(1, 0) * root, top.Vh.select(0, 0) * root};
}

// ---------------------------------------------------------------- the fits

LoConFactors fit_locon_factors(const torch::Tensor& D_, int64_t rank, const ExtractOptions& o) {
  check_fit_input(D_, "locon");
  auto D = F::to_compute(D_, D_);
  const int64_t O = D.size(0), I = D.size(1);
  check_fit_rank(rank, std::min(O, I), D, "locon", "at most min(out, in)");
  const auto kernel = kernel_of(D);
  auto M = F::flat(D);
  auto svd = F::svd_truncated(M, rank, o.svd, o.randomized);
  auto up = svd.U * svd.S.unsqueeze(0);  // the singular values all go into up (reference)
  auto down = svd.Vh;                    // (r, I·k)
  LoConFactors f;
  torch::Tensor approx;
  if (o.tucker && numel_of(kernel) > 1) {
    // Second SVD of down viewed as (I, r·k) at rank r' = min(I, r) (the reference's CP step):
    // down ≈ (U'Σ')·V'ᵀ → lora_down = (U'Σ')ᵀ (r', I, 1, …), lora_mid = V'ᵀ as (r', r, *K) swapped to (r, r', *K).
    const int64_t k = numel_of(kernel), r2 = std::min(I, rank);
    auto A = down.reshape({rank, I, k}).transpose(0, 1).reshape({I, rank * k});
    auto s2 = F::truncate(F::svd_full(A), r2);
    auto left = s2.U * s2.S.unsqueeze(0);  // (I, r')
    auto mid = with_kernel(s2.Vh, r2, rank, kernel).transpose(0, 1).contiguous();
    auto down_eff = left.matmul(s2.Vh).reshape({I, rank, k}).transpose(0, 1).reshape({rank, I * k});
    approx = up.matmul(down_eff);
    std::vector<int64_t> dshape{r2, I};
    dshape.resize(static_cast<size_t>(D.dim()), 1);
    f.weights = {left.t().reshape(dshape), up_shaped(up, D), mid};
    f.alpha = rank_alpha(r2, D, true);
  } else {
    approx = up.matmul(down);
    f.weights = {with_kernel(down, rank, I, kernel), up_shaped(up, D), {}};
    f.alpha = rank_alpha(rank, D, true);
  }
  // Residual of the stored low-rank part (for Tucker the reference used W_tuned − rebuild, docs/loaders.md#q41-extraction).
  if (o.sparse_bias) set_sparse_residual(f, M - approx, o.sparsity);
  return f;
}

LoHaFactors fit_loha_factors(const torch::Tensor& D_, int64_t rank, const ExtractOptions& o) {
  check_fit_input(D_, "loha");
  auto D = F::to_compute(D_, D_);
  const int64_t O = D.size(0), I = D.size(1);
  check_fit_rank(rank, std::min(O, I), D, "loha", "at most min(out, in)");
  auto M = F::flat(D);
  const int64_t N = M.size(1);
  const double m2 = M.square().sum().item<double>();
  auto error2 = [&](const torch::Tensor& P1, const torch::Tensor& P2) {
    return std::pow(torch::addcmul(M, P1, P2, -1).norm().item<double>(), 2);  // one temporary
  };
  auto gen = at::detail::createCPUGenerator(o.randomized.seed);
  auto randn = [&](int64_t r, int64_t c) {
    return torch::randn({r, c}, gen, torch::TensorOptions().dtype(M.scalar_type())).to(M.device());
  };
  // Start 1: (rank-r SVD) ⊙ (all ones) — exactly the rank-r LoCon approximation (the documented bound).
  auto svd = F::svd_truncated(M, rank, o.svd, o.randomized);
  auto root = svd.S.sqrt();
  auto A1 = svd.U * root.unsqueeze(0), B1 = svd.Vh * root.unsqueeze(1);
  auto A2 = torch::zeros({O, rank}, M.options()), B2 = torch::zeros({rank, N}, M.options());
  A2.select(1, 0).fill_(1);
  B2.select(0, 0).fill_(1);
  double best = error2(A1.matmul(B1), A2.matmul(B2));
  auto best_f = std::vector<torch::Tensor>{A1, B1, A2, B2};
  // ALS sweeps from a start; the best iterate over every start is kept.
  auto run = [&](torch::Tensor a1, torch::Tensor b1, torch::Tensor a2, torch::Tensor b2) {
    auto P1 = a1.matmul(b1), P2 = a2.matmul(b2);
    double prev = error2(P1, P2);
    for (int64_t it = 0; it < o.loha_iters; ++it) {
      a1 = als_rows(M, b1, P2, a2, b2);
      b1 = als_rows(M.t(), a1.t(), P2.t(), b2.t(), a2.t()).t();
      P1 = a1.matmul(b1);
      a2 = als_rows(M, b2, P1, a1, b1);
      b2 = als_rows(M.t(), a2.t(), P1.t(), b1.t(), a1.t()).t();
      P2 = a2.matmul(b2);
      const double e = error2(P1, P2);
      if (e < best) best = e, best_f = {a1, b1, a2, b2};
      // early stop: the sweep lowered the squared error by less than loha_tol of itself
      if (e < 1e-12 * m2 || (it >= 1 && prev - e < o.loha_tol * prev)) break;
      prev = e;
    }
  };
  if (rank > 1 && o.loha_iters > 0 && best > 1e-12 * m2) {
    // the unused terms of the second factor start small and random (exact zeros would stay zero under ALS)
    A2.narrow(1, 1, rank - 1).copy_(randn(O, rank - 1) * 1e-2);
    B2.narrow(0, 1, rank - 1).copy_(randn(rank - 1, N) * 1e-2);
    run(A1, B1, A2, B2);
  }
  A1 = best_f[0], B1 = best_f[1], A2 = best_f[2], B2 = best_f[3];
  balance_terms(A1, B1);
  balance_terms(A2, B2);
  // equal magnitudes for both Hadamard factors: (t·P1) ⊙ (P2/t)
  auto t = ((rms(A2) * rms(B2)) / (rms(A1) * rms(B1)).clamp_min(1e-30)).sqrt().sqrt();
  A1 = A1 * t, B1 = B1 * t, A2 = A2 / t, B2 = B2 / t;
  LoHaFactors f;
  f.weights = {A1.contiguous(), B1.contiguous(), A2.contiguous(), B2.contiguous(), {}, {}};
  f.alpha = rank_alpha(rank, D, false);
  return f;
}

LoKrFactors fit_lokr_factors(const torch::Tensor& D_, int64_t rank, const ExtractOptions& o) {
  check_fit_input(D_, "lokr");
  auto D = F::to_compute(D_, D_);
  const auto s = kron_split(D, o.lokr_factor);
  const auto kernel = kernel_of(D);
  const int64_t k = numel_of(kernel);
  check_fit_rank(rank, std::min(s.p, s.q), D, "lokr",
                 ("at most min(p, q) of W2 (" + std::to_string(s.p) + ", " + std::to_string(s.q) + ")").c_str());
  auto R = kron_rearrange(D, s);
  auto [w1, w2] = nearest_kronecker(R, o);
  const bool full_w2 = lokr_stores_full_w2(s, rank);
  F::SVD w2_svd;
  if (!full_w2) {
    // Alternate the two exact partial minimisers: ‖D − W1⊗W2‖² = ‖R‖² − 2·w1ᵀRw2 + ‖w1‖²‖w2‖².
    const double r2 = R.square().sum().item<double>();
    double best = INFINITY;
    torch::Tensor best_w1;
    for (int it = 0; it < 10; ++it) {
      auto w2_star = w1.matmul(R) / w1.dot(w1);
      auto svd = F::svd_truncated(w2_star.reshape({s.p, s.q * k}), rank, o.svd, o.randomized);
      auto w2_r = svd.reconstruct().flatten();
      w1 = R.matmul(w2_r) / w2_r.dot(w2_r);
      const double e = r2 - 2 * w1.dot(R.matmul(w2_r)).item<double>() +
                       w1.dot(w1).item<double>() * w2_r.dot(w2_r).item<double>();
      const bool stalled = best - e <= 1e-6 * best;
      if (e < best) best = e, best_w1 = w1, w2_svd = svd;
      if (stalled || e <= 1e-12 * r2) break;
    }
    w1 = best_w1;
  }
  // equal element magnitudes of W1 and W2 (better fp16 range, same product)
  auto w2_rms = full_w2 ? rms(w2) : rms(w2_svd.reconstruct());
  auto t = (w2_rms / rms(w1).clamp_min(1e-30)).sqrt();
  LoKrFactors f;
  f.alpha = rank_alpha(rank, D, false);
  f.weights.w1 = (w1 * t).reshape({s.a, s.c});
  if (full_w2) {
    f.weights.w2 = with_kernel(w2 / t, s.p, s.q, kernel);
  } else {
    auto root = (w2_svd.S / t).sqrt();
    f.weights.w2a = (w2_svd.U * root.unsqueeze(0)).contiguous();
    f.weights.w2b = (w2_svd.Vh * root.unsqueeze(1)).contiguous();
  }
  return f;
}

}  // namespace lycoris::tools
