#include "lycoris/functional/glokr.hpp"

#include <torch/torch.h>

#include "lycoris/functional/common.hpp"

namespace lycoris::functional::glokr {

LayerSpec channel_spec(const LayerSpec& layer) {
  return LayerSpec::linear(layer.in_features, layer.in_features, false);
}

Layout choose_layout(const LayerSpec& layer, int64_t rank, int64_t factor, bool decompose_both, bool full_matrix,
                     bool unbalanced_factorization, bool tucker) {
  Layout l;
  // A as a LoKr delta of the Linear I → I map: A1 (p, p) full, A2 (q, q) low-rank iff 2r < q
  l.a = lokr::choose_layout(channel_spec(layer), rank, factor, false, full_matrix, false, false);
  l.b = lokr::choose_layout(layer, rank, factor, decompose_both, full_matrix, unbalanced_factorization, tucker);
  return l;
}

bool all_full(const Weights& w) { return lokr::both_full(w.a) && lokr::both_full(w.b); }

int64_t rank(const Weights& w) { return w.a.w2b.defined() ? w.a.w2b.size(0) : lokr::rank(w.b); }

torch::Tensor a_matrix(const LayerSpec& layer, const Weights& w) {
  return lokr::diff_weight(channel_spec(layer), w.a, 1.0);
}

torch::Tensor diff_weight(const LayerSpec& layer, const Weights& w, const torch::Tensor& W, double scale) {
  const auto dtype = w.a.w1.scalar_type();
  // (W ×_in A)[o, j, κ] = Σ_i W[o, i, κ] · A[i, j] = (Aᵀ W[o, :, κ])[j] with Aᵀ = A1ᵀ ⊗ A2ᵀ: the LoKr
  // reshape trick on each row of W, O·k·I·(p + q) flops instead of O·k·I² and A never formed
  lokr::Weights at;
  at.w1 = w.a.w1.t();
  if (w.a.w2.defined()) {
    at.w2 = w.a.w2.t();
  } else {
    at.w2a = w.a.w2b.t();  // (A2a·A2b)ᵀ = A2bᵀ·A2aᵀ
    at.w2b = w.a.w2a.t();
  }
  auto WA = lokr::bypass_diff(to_compute(W, W).movedim(1, -1), channel_spec(layer), at, 1.0).movedim(-1, 1);
  auto B = to_compute(lokr::diff_weight(layer, w.b, 1.0), W);
  return ((WA + B) * scale).to(dtype);
}

torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const Weights& w, const torch::Tensor& W,
                          double scale) {
  auto xc = to_compute(x, x);
  // A x on the channel axis (last for Linear, the one before the spatial axes for convs): the LoKr reshape
  // trick with W1 = A1, W2 = A2, i.e. (…, p, q) → A2 on q, A1 on p; A is never formed
  const int64_t axis = xc.dim() - 1 - static_cast<int64_t>(layer.kernel.size());
  auto ax = lokr::bypass_diff(xc.movedim(axis, -1), channel_spec(layer), w.a, scale).movedim(-1, axis);
  auto y = host_op(ax, layer, to_compute(W, x)) + lokr::bypass_diff(xc, layer, w.b, scale);
  return y.to(x.scalar_type());
}

Weights init_weights(const LayerSpec& layer, const Layout& layout, int64_t rank, bool use_scalar,
                     const torch::TensorOptions& options) {
  // lokr::init_weights already zeroes W2 / W2b (unless use_scalar) and kaiming-inits the rest
  return {lokr::init_weights(channel_spec(layer), layout.a, rank, use_scalar, options),
          lokr::init_weights(layer, layout.b, rank, use_scalar, options)};
}

}  // namespace lycoris::functional::glokr
