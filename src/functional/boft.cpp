#include "lycoris/functional/boft.hpp"

#include <torch/torch.h>

#include "lycoris/error.hpp"
#include "lycoris/functional/channels.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/diag_oft.hpp"
#include "lycoris/functional/factorization.hpp"
#include "lycoris/functional/oft.hpp"

namespace lycoris::functional::boft {

std::optional<std::pair<int64_t, int64_t>> block_layout(int64_t out_features, int64_t rank) {
  return power2factorization(out_features, rank);
}

torch::Tensor butterfly_rows(const torch::Tensor& X, const torch::Tensor& G) {
  const int64_t stages = G.size(0), N = G.size(1), S = G.size(2), O = X.size(0);
  auto x = X.reshape({O, -1});
  const int64_t rest = x.size(1);
  for (int64_t i = 0; i < stages; ++i) {
    const int64_t h = (int64_t{1} << i) * S / 2;
    // P_i: (groups, g, j) → (groups, j, g)
    auto p = x.reshape({O / (2 * h), 2, h, rest}).transpose(1, 2).reshape({N, S, rest});
    p = torch::einsum("nab,nbr->nar", {G[i], p});
    x = p.reshape({O / (2 * h), h, 2, rest}).transpose(1, 2).reshape({O, rest});
  }
  return x.reshape(X.sizes());
}

torch::Tensor matrices(const torch::Tensor& blocks, double constraint, int64_t out_features, double m,
                       const torch::Tensor& like) {
  return oft::interpolate(oft::rotations(blocks, constraint, out_features, like), m);
}

torch::Tensor apply_weight(const torch::Tensor& W, const torch::Tensor& blocks, const torch::Tensor& rescale,
                           double constraint, double m) {
  auto w = to_compute(W, W);
  auto out = butterfly_rows(w, matrices(blocks, constraint, w.size(0), m, w));
  if (rescale.defined()) {
    std::vector<int64_t> shape(static_cast<size_t>(w.dim()), 1);
    shape[0] = w.size(0);
    out = out * oft::rescale_vector(rescale, w).reshape(shape);
  }
  return out.to(W.scalar_type());
}

torch::Tensor diff_weight(const torch::Tensor& W, const torch::Tensor& blocks, const torch::Tensor& rescale,
                          double constraint, double m) {
  auto w = to_compute(W, W);
  return (apply_weight(w, blocks, rescale, constraint, m) - w).to(W.scalar_type());
}

torch::Tensor bypass_forward(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                             const torch::Tensor& b, const torch::Tensor& blocks, const torch::Tensor& rescale,
                             double constraint, double m) {
  auto xc = to_compute(x, x);
  auto G = matrices(blocks, constraint, layer.out_features, m, xc);
  auto y = map_channel_rows(host_op(xc, layer, W.to(xc.options())), layer,
                            [&](const torch::Tensor& rows) { return butterfly_rows(rows, G); });
  if (rescale.defined()) y = scale_channels(y, layer, oft::rescale_vector(rescale, xc));
  if (b.defined()) y = add_channels(y, layer, b.to(xc.options()));
  return y.to(x.scalar_type());
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
