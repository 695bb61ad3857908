#include "lycoris/functional/diag_oft.hpp"

#include <torch/torch.h>

#include "lycoris/functional/common.hpp"
#include "lycoris/functional/factorization.hpp"
#include "lycoris/functional/oft.hpp"

namespace lycoris::functional::diag_oft {

std::pair<int64_t, int64_t> block_layout(int64_t out_features, int64_t rank) {
  auto f = factorization(out_features, rank);
  return {f.first, f.second};
}

std::vector<int64_t> rescale_shape(const LayerSpec& layer) {
  std::vector<int64_t> s(layer.weight_shape().size(), 1);
  s[0] = layer.out_features;
  return s;
}

torch::Tensor rotate_rows(const torch::Tensor& X, const torch::Tensor& M) {
  const int64_t N = M.size(0), S = M.size(1);
  auto x = X.reshape({N, S, -1});
  return torch::matmul(M.transpose(1, 2), x).reshape(X.sizes());
}

torch::Tensor matrices(const torch::Tensor& blocks, double constraint, int64_t out_features, double m,
                       const torch::Tensor& like, double dropout) {
  return oft::interpolate(oft::rotations(blocks, constraint, out_features, like), m, dropout);
}

torch::Tensor apply_weight(const torch::Tensor& W, const torch::Tensor& blocks, const torch::Tensor& rescale,
                           double constraint, double m, double dropout) {
  return oft::apply_rows(W, rescale, [&](const torch::Tensor& rows, const torch::Tensor& like) {
    return rotate_rows(rows, matrices(blocks, constraint, rows.size(0), m, like, dropout));
  });
}

torch::Tensor diff_weight(const torch::Tensor& W, const torch::Tensor& blocks, const torch::Tensor& rescale,
                          double constraint, double m) {
  auto w = to_compute(W, W);
  return (apply_weight(w, blocks, rescale, constraint, m) - w).to(W.scalar_type());
}

torch::Tensor bypass_forward(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                             const torch::Tensor& b, const torch::Tensor& blocks, const torch::Tensor& rescale,
                             double constraint, double m, double dropout) {
  return oft::bypass_rows(x, layer, W, b, rescale, [&](const torch::Tensor& rows, const torch::Tensor& like) {
    return rotate_rows(rows, matrices(blocks, constraint, layer.out_features, m, like, dropout));
  });
}

std::pair<torch::Tensor, torch::Tensor> init_weights(const LayerSpec& layer, int64_t rank, bool rescaled,
                                                     const torch::TensorOptions& options) {
  auto [S, N] = block_layout(layer.out_features, rank);
  auto blocks = torch::zeros({N, S, S}, options);
  auto rescale = rescaled ? torch::ones(rescale_shape(layer), options) : torch::Tensor();
  return {blocks, rescale};
}

}  // namespace lycoris::functional::diag_oft
