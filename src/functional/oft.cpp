#include "lycoris/functional/oft.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <limits>

#include "lycoris/functional/channels.hpp"
#include "lycoris/functional/common.hpp"

namespace lycoris::functional::oft {

torch::Tensor rotations(const torch::Tensor& blocks, double constraint, int64_t out_features,
                        const torch::Tensor& like) {
  auto b = blocks.to(like.options().dtype(compute_dtype(like)));
  auto Q = b - b.transpose(-1, -2);
  if (constraint > 0) {
    // a bound beyond the compute dtype's range binds exactly when q is infinite, as the dtype's largest value
    // does; torch refuses a scalar it cannot represent
    const double largest = Q.scalar_type() == torch::kFloat64 ? std::numeric_limits<double>::max()
                                                              : std::numeric_limits<float>::max();
    const double C = std::min(constraint * static_cast<double>(out_features), largest);
    auto q = Q.norm() + 1e-8;
    Q = torch::where(q > C, Q * (C / q), Q);
  }
  auto I = torch::eye(Q.size(-1), Q.options());
  // (I + Q) and (I − Q)⁻¹ commute (both are functions of Q), so R = (I − Q)⁻¹(I + Q): one solve instead of
  // an inverse and a product. I − Q is invertible for every finite skew-symmetric Q; blocks with NaN/Inf (or
  // so large that Q overflows) give NaN/Inf rotations, reported like any other non-finite result, not a
  // solver exception
  return std::get<0>(torch::linalg_solve_ex(I - Q, I + Q));
}

torch::Tensor interpolate(const torch::Tensor& R, double m, double dropout) {
  auto mR = R * m;
  if (dropout > 0) mR = torch::dropout(mR, dropout, /*train=*/true);
  if (m == 1 && dropout <= 0) return R;
  return mR + torch::eye(R.size(-1), R.options()) * (1 - m);
}

torch::Tensor rescale_vector(const torch::Tensor& rescale, const torch::Tensor& like) {
  if (!rescale.defined()) return rescale;
  return rescale.reshape({-1}).to(like.options());
}

torch::Tensor apply_rows(const torch::Tensor& W, const torch::Tensor& rescale, const RowMap& rotate) {
  auto w = to_compute(W, W);
  auto out = rotate(w, w);
  if (rescale.defined()) {
    std::vector<int64_t> shape(static_cast<size_t>(w.dim()), 1);
    shape[0] = w.size(0);
    out = out * rescale_vector(rescale, w).reshape(shape);
  }
  return out.to(W.scalar_type());
}

torch::Tensor bypass_rows(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& W,
                          const torch::Tensor& b, const torch::Tensor& rescale, const RowMap& rotate) {
  auto xc = to_compute(x, x);
  auto y = map_channel_rows(host_op(xc, layer, W.to(xc.options())), layer,
                            [&](const torch::Tensor& rows) { return rotate(rows, xc); });
  if (rescale.defined()) y = scale_channels(y, layer, rescale_vector(rescale, xc));
  if (b.defined()) y = add_channels(y, layer, b.to(xc.options()));
  return y.to(x.scalar_type());
}

}  // namespace lycoris::functional::oft
