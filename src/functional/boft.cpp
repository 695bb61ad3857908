#include "lycoris/functional/boft.hpp"

#include <torch/torch.h>

#include <vector>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/diag_oft.hpp"
#include "lycoris/functional/factorization.hpp"
#include "lycoris/functional/oft.hpp"

namespace lycoris::functional::boft {

std::optional<std::pair<int64_t, int64_t>> block_layout(int64_t out_features, int64_t rank) {
  return power2factorization(out_features, rank);
}

namespace {
// Row gather index of the interleave P_i of stage i: P_i·X = X[idx], idx[group·2h + 2j + g] = group·2h + g·h + j.
std::vector<int64_t> interleave(int64_t O, int64_t h) {
  std::vector<int64_t> idx(static_cast<size_t>(O));
  for (int64_t base = 0; base < O; base += 2 * h)
    for (int64_t j = 0; j < h; ++j)
      for (int64_t g = 0; g < 2; ++g) idx[static_cast<size_t>(base + 2 * j + g)] = base + g * h + j;
  return idx;
}
std::vector<int64_t> inverse(const std::vector<int64_t>& idx) {
  std::vector<int64_t> inv(idx.size());
  for (size_t q = 0; q < idx.size(); ++q) inv[static_cast<size_t>(idx[q])] = static_cast<int64_t>(q);
  return inv;
}
}  // namespace

torch::Tensor butterfly_rows(const torch::Tensor& X, const torch::Tensor& G) {
  const int64_t stages = G.size(0), N = G.size(1), S = G.size(2), O = X.size(0);
  auto x = X.reshape({O, -1});
  const int64_t rest = x.size(1);
  // One row gather between consecutive stages: P_{i+1}·P_iᵀ composed (P_0 first, P_lastᵀ at the end),
  // so every stage costs one gather and one batched matmul.
  std::vector<int64_t> current(static_cast<size_t>(O));  // current row q holds natural row current[q]
  for (int64_t q = 0; q < O; ++q) current[static_cast<size_t>(q)] = q;
  auto gather = [&](const std::vector<int64_t>& want) {  // reorder so that row q holds natural row want[q]
    auto pos = inverse(current);
    std::vector<int64_t> idx(want.size());
    for (size_t q = 0; q < want.size(); ++q) idx[q] = pos[static_cast<size_t>(want[q])];
    current = want;
    return torch::tensor(idx, torch::TensorOptions().dtype(torch::kInt64)).to(x.device());
  };
  std::vector<int64_t> natural(static_cast<size_t>(O));
  for (int64_t q = 0; q < O; ++q) natural[static_cast<size_t>(q)] = q;
  if (!torch::GradMode::is_enabled() || !(G.requires_grad() || x.requires_grad())) {
    // No autograd (merging, inference): two ping-pong buffers instead of two fresh tensors per stage.
    auto a = torch::empty({O, rest}, x.options()), b = torch::empty({O, rest}, x.options());
    torch::Tensor src = x;
    for (int64_t i = 0; i < stages; ++i) {
      const int64_t h = (int64_t{1} << i) * S / 2;
      torch::index_select_out(a, src, 0, gather(interleave(O, h)));
      auto out = b.view({N, S, rest});
      torch::matmul_out(out, G[i], a.view({N, S, rest}));
      src = b;
    }
    torch::index_select_out(a, src, 0, gather(natural));
    return a.reshape(X.sizes());
  }
  for (int64_t i = 0; i < stages; ++i) {
    const int64_t h = (int64_t{1} << i) * S / 2;
    x = x.index_select(0, gather(interleave(O, h)));
    // Y[n, a] = Σ_b G[i, n, a, b]·X[n, b] on the interleaved rows
    x = torch::matmul(G[i], x.view({N, S, rest})).view({O, rest});
  }
  x = x.index_select(0, gather(natural));
  return x.reshape(X.sizes());
}

torch::Tensor matrices(const torch::Tensor& blocks, double constraint, int64_t out_features, double m,
                       const torch::Tensor& like) {
  return oft::interpolate(oft::rotations(blocks, constraint, out_features, like), m);
}

torch::Tensor apply_weight(const torch::Tensor& W, const torch::Tensor& blocks, const torch::Tensor& rescale,
                           double constraint, double m) {
  return oft::apply_rows(W, rescale, [&](const torch::Tensor& rows, const torch::Tensor& like) {
    return butterfly_rows(rows, matrices(blocks, constraint, rows.size(0), m, like));
  });
}

torch::Tensor diff_weight(const torch::Tensor& W, const torch::Tensor& blocks, const torch::Tensor& rescale,
                          double constraint, double m) {
  auto w = to_compute(W, W);
  return (apply_weight(w, blocks, rescale, constraint, m) - w).to(W.scalar_type());
}

torch::Tensor bypass_forward(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                             const torch::Tensor& b, const torch::Tensor& blocks, const torch::Tensor& rescale,
                             double constraint, double m) {
  return oft::bypass_rows(x, layer, W, b, rescale, [&](const torch::Tensor& rows, const torch::Tensor& like) {
    return butterfly_rows(rows, matrices(blocks, constraint, layer.out_features, m, like));
  });
}

std::pair<torch::Tensor, torch::Tensor> init_weights(const LayerSpec& layer, int64_t rank, bool rescaled,
                                                     const torch::TensorOptions& options) {
  auto f = block_layout(layer.out_features, rank);
  if (!f)
    throw OptionError("boft: " + layer.describe() + ": no butterfly layout for " +
                      std::to_string(layer.out_features) + " output channels with rank " + std::to_string(rank) +
                      " (needs O = S·2^p with S even and S <= rank)");
  auto [S, N] = *f;
  int64_t stages = 1;
  while ((int64_t{1} << (stages - 1)) < N) ++stages;
  auto blocks = torch::zeros({stages, N, S, S}, options);
  auto rescale = rescaled ? torch::ones(diag_oft::rescale_shape(layer), options) : torch::Tensor();
  return {blocks, rescale};
}

}  // namespace lycoris::functional::boft
