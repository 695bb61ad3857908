#include "lycoris/functional/lokr.hpp"

#include <torch/torch.h>

#include <cmath>

#include "lycoris/functional/common.hpp"
#include "lycoris/functional/factorization.hpp"
#include "lycoris/functional/lora.hpp"

namespace lycoris::functional::lokr {

Layout choose_layout(const LayerSpec& layer, int64_t rank, int64_t factor, bool decompose_both, bool full_matrix,
                     bool unbalanced_factorization, bool tucker) {
  Layout l;
  auto [a, p] = factorization(layer.out_features, factor);
  if (unbalanced_factorization) std::swap(a, p);
  auto [c, q] = factorization(layer.in_features, factor);
  l.a = a;
  l.p = p;
  l.c = c;
  l.q = q;
  // "r < max(·)/2" of the reference, in integers
  l.w1_low_rank = decompose_both && 2 * rank < std::max(a, c) && !full_matrix;
  l.w2_low_rank = 2 * rank < std::max(p, q) && !full_matrix;
  l.tucker = l.w2_low_rank && lora::uses_tucker(layer, tucker);
  return l;
}

bool both_full(const Weights& w) { return w.w1.defined() && w.w2.defined(); }

int64_t rank(const Weights& w) {
  if (w.w1b.defined()) return w.w1b.size(0);
  if (w.t2.defined()) return w.t2.size(0);
  if (w.w2b.defined()) return w.w2b.size(0);
  return 0;
}

torch::Tensor w1(const Weights& w) {
  const auto& like = w.w1.defined() ? w.w1 : w.w1a;
  if (w.w1.defined()) return to_compute(w.w1, like);
  return torch::matmul(to_compute(w.w1a, like), to_compute(w.w1b, like));
}

torch::Tensor w2(const LayerSpec& layer, const Weights& w) {
  const auto& like = w.w2.defined() ? w.w2 : w.w2a;
  auto c = [&](const torch::Tensor& t) { return to_compute(t, like); };
  if (w.w2.defined()) return c(w.w2);
  if (w.t2.defined()) {
    // (i, j, *K) · w2_b (j, q) → (i, *K, q) → (i, q, *K); then w2_aᵀ (p, i) on axis 0
    auto tb = torch::matmul(c(w.t2).movedim(1, -1), c(w.w2b)).movedim(-1, 1);
    auto shape = tb.sizes().vec();
    shape[0] = w.w2a.size(1);
    return torch::matmul(c(w.w2a).t(), flat(tb)).reshape(shape);
  }
  std::vector<int64_t> shape{w.w2a.size(0), -1};
  shape.insert(shape.end(), layer.kernel.begin(), layer.kernel.end());
  return torch::matmul(c(w.w2a), c(w.w2b)).reshape(shape);
}

torch::Tensor diff_weight(const LayerSpec& layer, const Weights& w, double scale) {
  const auto dtype = (w.w1.defined() ? w.w1 : w.w1a).scalar_type();
  auto W1 = w1(w), W2 = w2(layer, w);
  std::vector<int64_t> s1{W1.size(0), W1.size(1)};
  s1.resize(static_cast<size_t>(W2.dim()), 1);
  // K[u·p + x, v·q + y, κ] = W1[u, v] · W2[x, y, κ]
  return (torch::kron(W1.reshape(s1), W2) * scale).reshape(layer.weight_shape()).to(dtype);
}

torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const Weights& w, double scale) {
  auto c = [&](const torch::Tensor& t) { return to_compute(t, x); };
  const int64_t a = w.w1.defined() ? w.w1.size(0) : w.w1a.size(0);
  const int64_t cg = w.w1.defined() ? w.w1.size(1) : w.w1b.size(1);
  const int64_t I = layer.in_features, q = I / cg;
  // W1 applied on the last axis (…, c) → (…, a)
  auto apply_w1 = [&](const torch::Tensor& h) {
    if (w.w1.defined()) return torch::matmul(h, c(w.w1).t());
    return torch::matmul(torch::matmul(h, c(w.w1b).t()), c(w.w1a).t());
  };
  auto xc = c(x);
  if (!layer.is_conv()) {
    auto lead = xc.sizes().vec();
    lead.pop_back();
    auto xs = lead;
    xs.push_back(cg);
    xs.push_back(q);
    auto h = xc.reshape(xs);  // (…, c, q)
    if (w.w2.defined())
      h = torch::matmul(h, c(w.w2).t());  // (…, c, p)
    else
      h = torch::matmul(torch::matmul(h, c(w.w2b).t()), c(w.w2a).t());
    auto g = apply_w1(h.transpose(-1, -2)).transpose(-1, -2);  // (…, p, c) → (…, p, a) → (…, a, p)
    lead.push_back(-1);
    return (g.reshape(lead) * scale).to(x.scalar_type());
  }
  const size_t nk = layer.kernel.size();
  const bool unbatched = xc.dim() == static_cast<int64_t>(nk) + 1;
  if (unbatched) xc = xc.unsqueeze(0);
  const int64_t B = xc.size(0);
  auto spatial = xc.sizes().slice(2).vec();
  std::vector<int64_t> grouped{B * cg, q};
  grouped.insert(grouped.end(), spatial.begin(), spatial.end());
  auto h = xc.reshape(grouped);  // (B·c, q, *S)
  if (w.w2.defined()) {
    h = host_op(h, layer, c(w.w2));
  } else if (w.t2.defined()) {
    h = pointwise_op(h, layer, c(w.w2b));
    h = host_op(h, layer, c(w.t2));
    h = pointwise_op(h, layer, c(w.w2a).t());
  } else {
    std::vector<int64_t> ks{w.w2b.size(0), q};
    ks.insert(ks.end(), layer.kernel.begin(), layer.kernel.end());
    h = host_op(h, layer, c(w.w2b).reshape(ks));
    h = pointwise_op(h, layer, c(w.w2a));
  }
  const int64_t p = h.size(1);
  auto out_spatial = h.sizes().slice(2).vec();
  std::vector<int64_t> split{B, cg, p};
  split.insert(split.end(), out_spatial.begin(), out_spatial.end());
  auto g = apply_w1(h.reshape(split).movedim(1, -1)).movedim(-1, 1);  // (B, a, p, *S')
  std::vector<int64_t> out{B, a * p};
  out.insert(out.end(), out_spatial.begin(), out_spatial.end());
  auto y = g.reshape(out) * scale;
  if (unbatched) y = y.squeeze(0);
  return y.to(x.scalar_type());
}

Weights init_weights(const LayerSpec& layer, const Layout& l, int64_t rank, bool use_scalar,
                     const torch::TensorOptions& options) {
  Weights w;
  auto ku = [](torch::Tensor t) {
    torch::nn::init::kaiming_uniform_(t, std::sqrt(5.0));
    return t;
  };
  auto zero_or_ku = [&](torch::Tensor t) { return use_scalar ? ku(t) : t.zero_(); };
  torch::NoGradGuard no_grad;
  if (l.w1_low_rank) {
    w.w1a = ku(torch::empty({l.a, rank}, options));
    w.w1b = ku(torch::empty({rank, l.c}, options));
  } else {
    w.w1 = ku(torch::empty({l.a, l.c}, options));
  }
  if (!l.w2_low_rank) {
    std::vector<int64_t> s{l.p, l.q};
    s.insert(s.end(), layer.kernel.begin(), layer.kernel.end());
    w.w2 = zero_or_ku(torch::empty(s, options));
  } else if (l.tucker) {
    std::vector<int64_t> s{rank, rank};
    s.insert(s.end(), layer.kernel.begin(), layer.kernel.end());
    w.t2 = ku(torch::empty(s, options));
    w.w2a = ku(torch::empty({rank, l.p}, options));
    w.w2b = zero_or_ku(torch::empty({rank, l.q}, options));
  } else {
    w.w2a = ku(torch::empty({l.p, rank}, options));
    w.w2b = zero_or_ku(torch::empty({rank, l.q * layer.kernel_numel()}, options));
  }
  return w;
}

}  // namespace lycoris::functional::lokr
