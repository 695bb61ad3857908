// `lycoris extract`: adapters from checkpoint differences (see include/lycoris/tools/extract.hpp).
#include "lycoris/tools/extract.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "exec/threads.hpp"
#include "exec/worker_pool.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/factorization.hpp"
#include "lycoris/io/output_path.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"
#include "tool_checks.hpp"

namespace lycoris::tools {

namespace F = functional;

namespace {

using Clock = std::chrono::steady_clock;

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

void check_fit_input(const torch::Tensor& D, const char* algo) {
  if (!D.defined() || D.dim() < 2 || D.dim() > 5)
    throw ShapeError(std::string(algo) + ": expected a Linear or Conv1d/2d/3d weight difference, got shape " +
                     (D.defined() ? F::shape_str(D.sizes()) : std::string("nothing")));
}

void check_rank(int64_t rank, int64_t limit, const torch::Tensor& D, const char* algo, const char* what) {
  if (rank < 1 || rank > limit)
    throw ShapeError(std::string(algo) + ": rank " + std::to_string(rank) + " is outside [1, " +
                     std::to_string(limit) + "] (" + what + ") for a layer of shape " + F::shape_str(D.sizes()));
}

// The reference's alpha of extracted LoCon files: r as a shape-(1,) tensor (so s = 1).
torch::Tensor alpha_tensor(int64_t r, const torch::Tensor& like, bool one_dim) {
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
void add_sparse_bias(NamedTensors& out, const torch::Tensor& E, double sparsity, std::string& note) {
  auto abs = E.abs();
  auto mask = (abs >= linear_quantile(abs, sparsity)) & (E != 0);
  auto idx = torch::nonzero(mask).t();  // (2, nnz), row-major order like coalesce()
  const bool fits16 = std::max(E.size(0), E.size(1)) <= 32767;
  if (!fits16) note += (note.empty() ? "" : "; ") + std::string("sparse-bias indices stored as int32 (dims > 32767)");
  const auto itype = fits16 ? torch::kInt16 : torch::kInt32;
  out.emplace_back("bias_indices", idx.to(itype));
  out.emplace_back("bias_values", E.masked_select(mask));
  out.emplace_back("bias_size", torch::tensor({E.size(0), E.size(1)}, torch::TensorOptions().dtype(itype))
                                    .to(E.device()));
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

struct KronSplit {
  int64_t a, p, c, q;
};
KronSplit kron_split(const torch::Tensor& D, int64_t factor) {
  auto [a, p] = F::factorization(D.size(0), factor);
  auto [c, q] = F::factorization(D.size(1), factor);
  return {a, p, c, q};
}

// D (a·p, c·q, *K) rearranged so that W1 ⊗ W2 becomes vec(W1)·vec(W2)ᵀ: R[(u,v), (x,y,κ)] = D[u·p+x, v·q+y, κ].
torch::Tensor rearrange(const torch::Tensor& D, const KronSplit& s) {
  const int64_t k = numel_of(kernel_of(D));
  return D.reshape({s.a, s.p, s.c, s.q, k}).permute({0, 2, 1, 3, 4}).reshape({s.a * s.c, s.p * s.q * k});
}

// Top singular triple of R split evenly: W1 = √σ·u (a·c), W2 = √σ·v (p·q·k).
std::pair<torch::Tensor, torch::Tensor> nearest_kronecker(const torch::Tensor& R, const ExtractOptions& o) {
  auto top = F::svd_truncated(R, 1, o.svd, o.randomized);
  auto root = top.S.index({0}).sqrt();
  return {top.U.select(1, 0) * root, top.Vh.select(0, 0) * root};
}

}  // namespace

// ---------------------------------------------------------------- options

ExtractAlgo parse_extract_algo(const std::string& name) {
  if (name == "locon" || name == "lora") return ExtractAlgo::LoCon;
  if (name == "loha") return ExtractAlgo::LoHa;
  if (name == "lokr") return ExtractAlgo::LoKr;
  throw OptionError("--algo: '" + name + "' is not one of locon, loha, lokr");
}

const char* to_string(ExtractAlgo algo) {
  switch (algo) {
    case ExtractAlgo::LoCon: return "locon";
    case ExtractAlgo::LoHa: return "loha";
    case ExtractAlgo::LoKr: return "lokr";
  }
  return "?";
}

// ---------------------------------------------------------------- layer fits

LayerFit fit_locon(const torch::Tensor& D_, int64_t rank, const ExtractOptions& o) {
  check_fit_input(D_, "locon");
  auto D = F::to_compute(D_, D_);
  const int64_t O = D.size(0), I = D.size(1);
  check_rank(rank, std::min(O, I), D, "locon", "at most min(out, in)");
  const auto kernel = kernel_of(D);
  auto M = F::flat(D);
  auto svd = F::svd_truncated(M, rank, o.svd, o.randomized);
  auto up = svd.U * svd.S.unsqueeze(0);  // the singular values all go into up (reference)
  auto down = svd.Vh;                    // (r, I·k)
  LayerFit fit;
  fit.rank = rank;
  const bool tucker = o.tucker && numel_of(kernel) > 1;
  torch::Tensor approx;
  if (tucker) {
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
    fit.form = "lora+tucker";
    fit.tensors = {{"alpha", alpha_tensor(r2, D, true)},
                   {"lora_up.weight", up_shaped(up, D)},
                   {"lora_down.weight", left.t().reshape(dshape)},
                   {"lora_mid.weight", mid}};
  } else {
    approx = up.matmul(down);
    fit.form = "lora";
    fit.tensors = {{"alpha", alpha_tensor(rank, D, true)},
                   {"lora_up.weight", up_shaped(up, D)},
                   {"lora_down.weight", with_kernel(down, rank, I, kernel)}};
  }
  // Residual of the stored low-rank part (for Tucker the reference used W_tuned − rebuild, docs/loaders.md#q41-extraction).
  if (o.sparse_bias) add_sparse_bias(fit.tensors, M - approx, o.sparsity, fit.note);
  return fit;
}

LayerFit fit_loha(const torch::Tensor& D_, int64_t rank, const ExtractOptions& o) {
  check_fit_input(D_, "loha");
  auto D = F::to_compute(D_, D_);
  const int64_t O = D.size(0), I = D.size(1);
  check_rank(rank, std::min(O, I), D, "loha", "at most min(out, in)");
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
  LayerFit fit;
  fit.rank = rank;
  fit.form = "loha";
  fit.tensors = {{"alpha", alpha_tensor(rank, D, false)},
                 {"hada_w1_a", A1.contiguous()},
                 {"hada_w1_b", B1.contiguous()},
                 {"hada_w2_a", A2.contiguous()},
                 {"hada_w2_b", B2.contiguous()}};
  return fit;
}

LayerFit fit_lokr(const torch::Tensor& D_, int64_t rank, const ExtractOptions& o) {
  check_fit_input(D_, "lokr");
  auto D = F::to_compute(D_, D_);
  const auto s = kron_split(D, o.lokr_factor);
  const auto kernel = kernel_of(D);
  const int64_t k = numel_of(kernel);
  check_rank(rank, std::min(s.p, s.q), D,
             "lokr", ("at most min(p, q) of W2 (" + std::to_string(s.p) + ", " + std::to_string(s.q) + ")").c_str());
  auto R = rearrange(D, s);
  auto [w1, w2] = nearest_kronecker(R, o);
  const bool full_w2 = static_cast<double>(rank) >= static_cast<double>(std::max(s.p, s.q)) / 2.0;
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
  LayerFit fit;
  fit.rank = rank;
  fit.tensors = {{"alpha", alpha_tensor(rank, D, false)}, {"lokr_w1", (w1 * t).reshape({s.a, s.c})}};
  if (full_w2) {
    fit.form = "lokr(full w2)";
    fit.tensors.emplace_back("lokr_w2", with_kernel(w2 / t, s.p, s.q, kernel));
  } else {
    fit.form = "lokr";
    auto root = (w2_svd.S / t).sqrt();
    fit.tensors.emplace_back("lokr_w2_a", (w2_svd.U * root.unsqueeze(0)).contiguous());
    fit.tensors.emplace_back("lokr_w2_b", (w2_svd.Vh * root.unsqueeze(1)).contiguous());
  }
  return fit;
}

LayerFit extract_layer(const torch::Tensor& D_, const torch::Tensor& bias_delta, const ExtractOptions& o) {
  check_fit_input(D_, "extract");
  auto D = F::to_compute(D_, D_);
  const int64_t O = D.size(0), I = D.size(1);
  const auto kernel = kernel_of(D);
  const bool linear_like = numel_of(kernel) == 1;
  const RankRule rule{o.mode, linear_like ? o.linear_param : o.conv_param};
  auto full = [&](std::string note) {
    LayerFit fit;
    fit.form = "diff";
    fit.note = std::move(note);
    fit.tensors = {{"diff", D}};
    if (bias_delta.defined()) fit.tensors.emplace_back("diff_b", F::to_compute(bias_delta, D));
    return fit;
  };
  if (o.mode == RankMode::Full) return full("");
  LayerFit fit;
  int64_t raw = 0, r = 0;
  std::string clamp_note;
  if (o.algo == ExtractAlgo::LoKr) {
    const auto s = kron_split(D, o.lokr_factor);
    if (o.mode != RankMode::Fixed) {
      auto w2 = nearest_kronecker(rearrange(D, s), o).second;
      raw = select_rank(F::singular_values(w2.reshape({s.p, s.q * numel_of(kernel)})), rule);
    } else {
      raw = select_rank({}, rule);
    }
    r = clamp_rank(raw, s.p, s.q);
    fit = fit_lokr(D, r, o);
  } else {
    raw = o.mode == RankMode::Fixed ? select_rank({}, rule) : select_rank(F::singular_values_gram(F::flat(D)), rule);
    r = clamp_rank(raw, O, I);
    // LoCon: a rank of at least half the outputs is stored as the full difference (reference rule)
    if (o.algo == ExtractAlgo::LoCon && static_cast<double>(r) >= static_cast<double>(O) / 2.0)
      return full("rank " + std::to_string(r) + " ≥ out/2: full difference");
    fit = o.algo == ExtractAlgo::LoCon ? fit_locon(D, r, o) : fit_loha(D, r, o);
  }
  if (o.mode == RankMode::Fixed && r < raw) clamp_note = "rank clamped to " + std::to_string(r);
  if (bias_delta.defined() && bias_delta.abs().max().item<double>() > 0)
    clamp_note += (clamp_note.empty() ? "" : "; ") + std::string("bias change dropped (low-rank layer)");
  if (!clamp_note.empty()) fit.note = clamp_note + (fit.note.empty() ? "" : "; " + fit.note);
  return fit;
}

torch::Tensor fit_delta(const LayerFit& fit, torch::IntArrayRef weight_shape) {
  if (fit.form == "diff" || fit.form == "norm") return F::to_compute(fit.tensors.front().second, fit.tensors.front().second);
  TensorMap map(fit.tensors.begin(), fit.tensors.end());
  auto like = map.at("alpha");
  auto spec = LayerSpec::from_weight_shape(weight_shape.vec(), false);
  auto adapter = load_adapter("extract", map, spec);
  auto zero = torch::zeros(weight_shape, like.options().dtype(torch::kFloat32));
  return adapter->apply_weight(zero, 1.0);
}

std::string extract_module_name(const std::string& prefix, const std::string& path) {
  if (prefix == "kohya")
    return naming::module_name(path.rfind("text_model.", 0) == 0 ? "lora_te" : "lora_unet", path);
  return naming::module_name(prefix, path);
}

// ---------------------------------------------------------------- the checkpoint-level tool

namespace {

void validate(const ExtractOptions& o) {
  if (o.mode != RankMode::Full) {
    validate(RankRule{o.mode, o.linear_param}, "linear " + std::string(to_string(o.mode)));
    validate(RankRule{o.mode, o.conv_param}, "conv " + std::string(to_string(o.mode)));
  }
  if (o.sparse_bias && o.algo != ExtractAlgo::LoCon)
    throw OptionError("--use-sparse-bias: only LoCon files can carry a sparse bias (docs/format.md#sparse-bias)");
  if (std::isnan(o.sparsity) || o.sparsity < 0 || o.sparsity > 1)
    throw OptionError("--sparsity: " + std::to_string(o.sparsity) + " is outside [0, 1]");
  if (!torch::isFloatingType(o.dtype)) throw OptionError("extract: the output dtype must be a floating-point type");
  if (o.loha_iters < 0) throw OptionError("--loha-iters: must be ≥ 0");
  if (!(o.loha_tol >= 0)) throw OptionError("--loha-tol: must be ≥ 0");
  if (o.prefix.empty()) throw OptionError("--prefix: must not be empty");
  if (o.threads < 0) throw OptionError("--threads: must be ≥ 0");
}

bool is_weight_key(const std::string& key) {
  return key == "weight" || (key.size() > 7 && key.compare(key.size() - 7, 7, ".weight") == 0);
}

// Every weight key (and the bias of each) must be in both checkpoints.
void check_same_keys(const io::SafetensorsFile& base, const io::SafetensorsFile& tuned) {
  std::vector<std::string> missing;
  auto scan = [&](const io::SafetensorsFile& a, const io::SafetensorsFile& b, const char* where) {
    for (const auto& layer : naming::base_layers(a.names())) {
      for (const auto* key : {&layer.weight_key, &layer.bias_key})
        if (!key->empty() && !b.contains(*key)) missing.push_back("'" + *key + "' only in " + where);
    }
  };
  scan(base, tuned, base.path().c_str());
  scan(tuned, base, tuned.path().c_str());
  if (missing.empty()) return;
  std::string msg = "extract: the checkpoints do not have the same layers: ";
  for (size_t i = 0; i < missing.size() && i < 5; ++i) msg += (i ? ", " : "") + missing[i];
  if (missing.size() > 5) msg += " and " + std::to_string(missing.size() - 5) + " more";
  throw KeyError(msg);
}

struct Entry {
  std::string key;
  io::DType dtype;
  std::vector<int64_t> shape;
  torch::Tensor tensor;                    // CPU, output dtype; undefined when produced while writing
  std::function<torch::Tensor()> produce;  // full differences are recomputed instead of kept in memory
};

std::string options_record(const ExtractOptions& o) {
  nlohmann::json j;
  j["algo"] = to_string(o.algo);
  j["mode"] = to_string(o.mode);
  j["linear"] = o.linear_param;
  j["conv"] = o.conv_param;
  j["tucker"] = o.tucker;
  if (o.sparse_bias) j["sparsity"] = o.sparsity;
  return j.dump();
}

// Drops this process's pages of a tensor's bytes in a mapped input once the layer is done: the mapping is
// read-only MAP_PRIVATE, so the pages come back from the page cache if touched again, and the resident set
// stays at one layer instead of growing to both checkpoints (3.4 GB at SD1.5 scale).
void release_pages(const io::SafetensorsFile& f, const std::string& key) {
#ifdef MADV_DONTNEED
  const auto& info = f.info(key);
  if (info.nbytes() == 0) return;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto at = reinterpret_cast<uintptr_t>(f.data(info));
  const auto begin = at / page * page;
  madvise(reinterpret_cast<void*>(begin), at + info.nbytes() - begin, MADV_DONTNEED);
#endif
}

// tuned − base of one key in fp32 (exact for fp16/bf16 inputs), into `out` when given (a reused buffer).
torch::Tensor difference(const io::SafetensorsFile& base, const io::SafetensorsFile& tuned, const std::string& key,
                         torch::Device device, torch::Tensor out = {}) {
  auto wt = tuned.tensor(key), wb = base.tensor(key);
  if (!out.defined()) out = torch::empty(wt.sizes(), torch::TensorOptions().dtype(torch::kFloat32).device(device));
  out.copy_(wt);
  out.sub_(wb.to(device));  // computed in fp32 (type promotion of the in-place op)
  return out;
}

// max|D|: NaN when D holds a NaN, Inf when it holds an Inf.
double max_abs(const torch::Tensor& D) {
  return torch::linalg_vector_norm(D, INFINITY, c10::nullopt, false, c10::nullopt).item<double>();
}

// For tuned − base of `key` with max|D| = dmax not finite: FormatError naming the input file whose tensor has
// NaN/Inf, else Error for the F32 subtraction itself overflowing.
void require_finite_difference(double dmax, const io::SafetensorsFile& base, const io::SafetensorsFile& tuned,
                               const std::string& key) {
  if (std::isfinite(dmax)) return;
  require_finite(base.tensor(key), base.path(), key);
  require_finite(tuned.tensor(key), tuned.path(), key);
  throw Error(tuned.path() + ": tensor '" + key + "': tuned − base overflows F32 (the difference is computed in F32)");
}

// The reference's test allclose(W_tuned, W_base, rtol 1e-5, atol 1e-8) (fp32), decided from D = W_tuned − W_base
// (dmax = max|D|) without full-size temporaries: max|D| = 0 → close; max|D| above atol + rtol·max|W_base| → the
// element holding max|D| fails its own bound; only in between (rare) is the element-wise test run.
bool unchanged(const torch::Tensor& D, double dmax, const io::SafetensorsFile& base, const io::SafetensorsFile& tuned,
               const std::string& key) {
  if (dmax == 0) return true;
  auto wb = base.tensor(key);
  const double bmax =
      torch::linalg_vector_norm(wb, INFINITY, c10::nullopt, false, torch::kFloat32).item<double>();
  if (dmax > (1e-8 + 1e-5 * bmax) * (1 + 1e-5)) return false;
  return torch::allclose(tuned.tensor(key, torch::kFloat32, D.device()), wb.to(D.device(), torch::kFloat32), 1e-5,
                         1e-8);
}

// One reused fp32 buffer for D: a single allocation of the largest layer instead of fresh pages per layer.
struct Workspace {
  torch::Tensor buffer;
  torch::Tensor take(const std::vector<int64_t>& shape, torch::Device device) {
    const int64_t n = numel_of(shape);
    if (!buffer.defined() || buffer.numel() < n || buffer.device() != device)
      buffer = torch::empty({n}, torch::TensorOptions().dtype(torch::kFloat32).device(device));
    return buffer.narrow(0, 0, n).view(shape);
  }
};

// ‖D − ΔW(fit)‖_F with ΔW rebuilt from the stored tensors. A plain LoRA is checked in row blocks of ~4 MB
// (D_b − s·up_b·down, one addmm each, no full-size rebuild); other forms through fit_delta.
double residual_norm(const torch::Tensor& D, const LayerFit& fit) {
  if (fit.form == "diff" || fit.form == "norm") {
    const auto& t = fit.tensors.front().second;
    return (t.to(D.scalar_type()) - D).norm().item<double>();
  }
  TensorMap m(fit.tensors.begin(), fit.tensors.end());
  if (fit.form == "lora" && !m.count("bias_indices")) {
    auto M = F::flat(D);
    auto up = m.at("lora_up.weight").reshape({D.size(0), -1}).to(D.scalar_type());
    auto down = m.at("lora_down.weight").reshape({up.size(1), M.size(1)}).to(D.scalar_type());
    const double scale = F::scalar_value(m.at("alpha"), "extract", "alpha") / static_cast<double>(up.size(1));
    const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(M.size(1), 1));
    double e2 = 0;
    for (int64_t i = 0; i < M.size(0); i += rows) {
      const int64_t n = std::min(rows, M.size(0) - i);
      e2 += std::pow(torch::addmm(M.narrow(0, i, n), up.narrow(0, i, n), down, 1, -scale).norm().item<double>(), 2);
    }
    return std::sqrt(e2);
  }
  if (fit.form == "lokr" || fit.form == "lokr(full w2)") {
    // ‖D − s·W1⊗W2‖² = ‖D‖² − 2s·Σ_uv W1[u,v]·⟨D_uv, W2⟩ + s²‖W1‖²‖W2‖² over the (p, q·k) blocks D_uv, one row
    // block u at a time in fp64 (no rearranged copy of D, no rebuild; fp64 keeps the difference exact enough)
    const auto f64 = torch::kFloat64;
    auto w1 = m.at("lokr_w1").to(f64);
    torch::Tensor w2;
    double scale = 1;
    if (m.count("lokr_w2")) {
      w2 = m.at("lokr_w2").to(f64);
    } else {
      auto a = m.at("lokr_w2_a").to(f64);
      w2 = a.matmul(m.at("lokr_w2_b").to(f64).reshape({a.size(1), -1}));
      scale = F::scalar_value(m.at("alpha"), "extract", "alpha") / static_cast<double>(a.size(1));
    }
    const int64_t A = w1.size(0), C = w1.size(1), P = D.size(0) / A;
    w2 = w2.reshape({P, -1});
    auto blocks = D.reshape({A, P, C, w2.size(1)});
    double d2 = 0, cross = 0;
    for (int64_t u = 0; u < A; ++u) {
      auto Du = blocks.select(0, u).to(f64);  // (p, c, q·k)
      d2 += Du.square().sum().item<double>();
      cross += torch::einsum("pcn,pn->c", {Du, w2}).dot(w1.select(0, u)).item<double>();
    }
    const double e2 = d2 - 2 * scale * cross + scale * scale * w1.square().sum().item<double>() *
                                                   w2.square().sum().item<double>();
    return std::sqrt(std::max(e2, 0.0));
  }
  auto approx = fit_delta(fit, D.sizes()).to(D.scalar_type());
  if (approx.is_alias_of(D)) return (approx - D).norm().item<double>();
  return approx.sub_(D).norm().item<double>();
}

// The result of one layer, produced by a worker and consumed in base order.
struct LayerOutcome {
  enum Kind { Unchanged, Skipped, Extracted } kind = Unchanged;
  ExtractLayerReport report;
  std::vector<std::pair<std::string, torch::Tensor>> stored;  // suffix → CPU tensor (output dtype)
  std::vector<std::pair<std::string, std::string>> deferred;  // suffix → key whose tuned − base is written
  io::DType deferred_dtype{};
  std::vector<std::vector<int64_t>> deferred_shapes;
  double err = 0;
};

LayerOutcome process_layer(const naming::BaseLayer& layer, const io::SafetensorsFile& base,
                           const io::SafetensorsFile& tuned, const ExtractOptions& o, Workspace& ws) {
  LayerOutcome out;
  const auto lt0 = Clock::now();
  const auto& bi = base.info(layer.weight_key);
  const auto& ti = tuned.info(layer.weight_key);
  auto done_with_inputs = [&] {
    for (const auto* key : {&layer.weight_key, &layer.bias_key})
      if (!key->empty()) release_pages(base, *key), release_pages(tuned, *key);
  };
  // byte-identical weights (most unchanged layers) need no arithmetic at all
  if (bi.dtype == ti.dtype && bi.nbytes() == ti.nbytes() &&
      std::memcmp(base.data(bi), tuned.data(ti), bi.nbytes()) == 0) {
    done_with_inputs();
    return out;
  }
  auto D = difference(base, tuned, layer.weight_key, o.device, ws.take(bi.shape, o.device));
  const double dmax = max_abs(D);
  require_finite_difference(dmax, base, tuned, layer.weight_key);
  if (unchanged(D, dmax, base, tuned, layer.weight_key)) {
    done_with_inputs();
    return out;
  }
  torch::Tensor bias_delta;
  if (!layer.bias_key.empty()) {
    bias_delta = difference(base, tuned, layer.bias_key, o.device);
    require_finite_difference(max_abs(bias_delta), base, tuned, layer.bias_key);
  }
  done_with_inputs();

  auto& lr = out.report;
  lr.module = extract_module_name(o.prefix, layer.path);
  lr.key = layer.weight_key;
  lr.shape = bi.shape;
  lr.delta_norm = D.norm().item<double>();
  if (D.dim() > 5 || (D.dim() == 1 && o.mode != RankMode::Full)) {
    out.kind = LayerOutcome::Skipped;
    lr.form = "skipped";
    lr.note = D.dim() == 1 ? "1-D (norm) layers are extracted only in full mode"
                           : "weights with more than 5 dims are not Linear/Conv layers";
    return out;
  }
  LayerFit fit;
  if (D.dim() == 1) {
    fit.form = "norm";
    fit.tensors = {{"w_norm", D}};
    if (bias_delta.defined()) fit.tensors.emplace_back("b_norm", bias_delta);
  } else {
    fit = extract_layer(D, bias_delta, o);
  }
  // what the file will hold: floats in the output dtype, all finite
  for (auto& [suffix, t] : fit.tensors)
    if (torch::isFloatingType(t.scalar_type()))
      t = round_finite(t, o.dtype, "layer " + layer.weight_key, lr.module + "." + suffix,
                       "choose a wider --dtype (bf16, fp32)");
  out.kind = LayerOutcome::Extracted;
  out.err = residual_norm(D, fit);
  lr.form = fit.form;
  lr.rank = fit.rank;
  lr.note = fit.note;
  lr.rel_error = lr.delta_norm > 0 ? out.err / lr.delta_norm : 0;
  const bool deferred = fit.form == "diff" || fit.form == "norm";
  for (auto& [suffix, t] : fit.tensors) {
    if (deferred) {
      // recomputed from the mapped files while writing: tuned − base of the weight or of the bias
      const bool is_bias = suffix == "diff_b" || suffix == "b_norm";
      out.deferred.emplace_back(suffix, is_bias ? layer.bias_key : layer.weight_key);
      out.deferred_dtype = io::from_torch(t.scalar_type());
      out.deferred_shapes.push_back(t.sizes().vec());
    } else {
      auto c = t.to(torch::kCPU).contiguous();
      out.stored.emplace_back(suffix, c.is_alias_of(D) ? c.clone() : c);  // D is the reused buffer
    }
  }
  lr.seconds = std::chrono::duration<double>(Clock::now() - lt0).count();
  return out;
}

}  // namespace

ExtractReport extract(const std::string& base_path, const std::string& tuned_path, const std::string& output,
                      const ExtractOptions& o, const std::function<void(const ExtractLayerReport&)>& on_layer) {
  const auto t0 = Clock::now();
  validate(o);
  io::check_output_path(output);  // before minutes of work
  auto base = io::SafetensorsFile::open(base_path);
  auto tuned = io::SafetensorsFile::open(tuned_path);
  check_same_keys(base, tuned);

  // header-only checks first, so that a bad pair fails before any arithmetic
  std::vector<naming::BaseLayer> layers;
  for (const auto& layer : naming::base_layers(base.names())) {
    const auto& bi = base.info(layer.weight_key);
    const auto& ti = tuned.info(layer.weight_key);
    if (bi.shape != ti.shape)
      throw ShapeError("extract: '" + layer.weight_key + "' has shape " + F::shape_str(bi.shape) + " in " +
                       base_path + " but " + F::shape_str(ti.shape) + " in " + tuned_path);
    if (!torch::isFloatingType(io::to_torch(bi.dtype)) || !torch::isFloatingType(io::to_torch(ti.dtype))) continue;
    if (!layer.bias_key.empty() && base.info(layer.bias_key).shape != tuned.info(layer.bias_key).shape)
      throw ShapeError("extract: '" + layer.bias_key + "' has different shapes in the two checkpoints");
    layers.push_back(layer);
  }

  // Layer-parallel: `workers` layers in flight, each single-threaded (intra-op and BLAS), results consumed in
  // base order. Small per-layer operations (QR of thin sketches, small SVDs, ALS solves) do not scale
  // across threads; independent layers do.
  const int workers = static_cast<int>(
      std::clamp<int64_t>(o.threads > 0 ? o.threads : at::get_num_threads(), 1, std::max<size_t>(layers.size(), 1)));
  exec::IntraOpThreads one_thread(1);
  exec::SingleThreadedBlas blas;  // layer-parallel workers: each BLAS call in its caller's thread
  std::vector<Workspace> workspaces(static_cast<size_t>(workers));
  exec::OrderedMap<LayerOutcome> results(layers.size(), workers, [&](size_t i, int worker) -> LayerOutcome {
    try {
      return process_layer(layers[i], base, tuned, o, workspaces[static_cast<size_t>(worker)]);
    } catch (...) {
      rethrow_with_context({tuned.path(), base.path()}, "layer " + layers[i].weight_key);
    }
  });

  ExtractReport report;
  std::vector<Entry> entries;
  std::set<std::string> names;
  double err2 = 0, norm2 = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    LayerOutcome r = results.take(i);
    if (r.kind == LayerOutcome::Unchanged) {
      ++report.unchanged;
      continue;
    }
    auto& lr = r.report;
    if (r.kind == LayerOutcome::Skipped) {
      ++report.skipped;
    } else {
      if (!names.insert(lr.module).second)
        throw KeyError("extract: two layers map to the module name '" + lr.module + "' (colliding paths)");
      err2 += r.err * r.err;
      norm2 += lr.delta_norm * lr.delta_norm;
      for (auto& [suffix, t] : r.stored)
        entries.push_back({lr.module + "." + suffix, io::from_torch(t.scalar_type()), t.sizes().vec(), t, {}});
      for (size_t k = 0; k < r.deferred.size(); ++k) {
        const std::string key = r.deferred[k].second;
        entries.push_back({lr.module + "." + r.deferred[k].first, r.deferred_dtype, r.deferred_shapes[k], {},
                           [&base, &tuned, key, dtype = o.dtype] {
                             auto t = difference(base, tuned, key, torch::kCPU).to(dtype);
                             release_pages(base, key), release_pages(tuned, key);
                             return t;
                           }});
      }
    }
    report.layers.push_back(lr);
    if (on_layer) on_layer(lr);
  }
  report.total_rel_error = norm2 > 0 ? std::sqrt(err2 / norm2) : 0;

  std::vector<io::TensorDecl> decls;
  for (const auto& e : entries) decls.push_back({e.key, e.dtype, e.shape});
  io::SafetensorsWriter writer(output, decls, {{"lycoris_extract", options_record(o)}});
  for (const auto& e : entries) {
    auto t = e.tensor.defined() ? e.tensor : e.produce();
    writer.write(e.key, t);
    report.bytes_written += static_cast<uint64_t>(t.numel()) * static_cast<uint64_t>(t.element_size());
  }
  writer.commit();
  report.tensors_written = entries.size();
  report.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return report;
}

}  // namespace lycoris::tools
