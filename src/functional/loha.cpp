#include "lycoris/functional/loha.hpp"

#include <torch/torch.h>

#include "lycoris/functional/common.hpp"

namespace lycoris::functional::loha {

namespace {
// Tucker mode product: R[o, c, κ] = Σ_{i,j} t[i, j, κ] · a[i, o] · b[j, c]  → (O, I, *K)
torch::Tensor tucker_product(const torch::Tensor& t, const torch::Tensor& a, const torch::Tensor& b) {
  auto tb = torch::matmul(t.movedim(1, -1), b).movedim(-1, 1);  // (i, c, *K)
  auto shape = tb.sizes().vec();
  auto r = torch::matmul(a.t(), flat(tb));  // (O, c·k)
  shape[0] = a.size(1);
  return r.reshape(shape);
}
}  // namespace

torch::Tensor diff_weight(const LayerSpec& layer, const Weights& w, double scale) {
  const auto& like = w.w1a;
  auto c = [&](const torch::Tensor& t) { return to_compute(t, like); };
  torch::Tensor dw;
  if (w.t1.defined()) {
    dw = tucker_product(c(w.t1), c(w.w1a), c(w.w1b)) * tucker_product(c(w.t2), c(w.w2a), c(w.w2b));
  } else {
    dw = torch::matmul(c(w.w1a), c(w.w1b)) * torch::matmul(c(w.w2a), c(w.w2b));
  }
  return (dw * scale).reshape(layer.weight_shape()).to(like.scalar_type());
}

lora::Weights as_lora(const LayerSpec& layer, const Weights& w) {
  const auto& like = w.w1a;
  auto c = [&](const torch::Tensor& t) { return to_compute(t, like); };
  // outer products over the two rank axes, flattened to one axis of size r1·r2
  auto pair_rows = [](const torch::Tensor& p, const torch::Tensor& q) {  // (r1, n), (r2, n) → (r1·r2, n)
    return (p.unsqueeze(1) * q.unsqueeze(0)).reshape({p.size(0) * q.size(0), p.size(1)});
  };
  lora::Weights l;
  std::vector<int64_t> down_shape{-1, layer.in_features};
  if (w.t1.defined()) {
    for (size_t i = 0; i < layer.kernel.size(); ++i) down_shape.push_back(1);
    l.up = pair_rows(c(w.w1a), c(w.w2a)).t();                  // (O, R)
    l.down = pair_rows(c(w.w1b), c(w.w2b)).reshape(down_shape);  // (R, I, 1, …)
    auto t1 = c(w.t1), t2 = c(w.t2);                           // (i, j, *K), (i', j', *K)
    auto core = t1.unsqueeze(1).unsqueeze(3) * t2.unsqueeze(0).unsqueeze(2);  // (i, i', j, j', *K)
    auto shape = core.sizes().vec();
    std::vector<int64_t> mid{shape[0] * shape[1], shape[2] * shape[3]};
    mid.insert(mid.end(), shape.begin() + 4, shape.end());
    l.mid = core.reshape(mid);
  } else {
    down_shape.insert(down_shape.end(), layer.kernel.begin(), layer.kernel.end());
    l.up = pair_rows(c(w.w1a).t(), c(w.w2a).t()).t();          // (O, R)
    l.down = pair_rows(c(w.w1b), c(w.w2b)).reshape(down_shape);  // (R, I, *K)
  }
  return l;
}

torch::Tensor bypass_diff(const torch::Tensor& x, const LayerSpec& layer, const Weights& w, double scale) {
  return lora::bypass_diff(x, layer, as_lora(layer, w), scale);
}

bool bypass_is_cheaper(const LayerSpec& layer, const Weights& w) {
  const int64_t O = layer.out_features, I = layer.in_features, k = layer.kernel_numel();
  const int64_t R = w.w1b.size(0) * w.w2b.size(0);
  const int64_t factored = w.t1.defined() ? R * I + R * R * k + R * O : R * I * k + R * O;
  return factored < O * I * k;
}

Weights init_weights(const LayerSpec& layer, int64_t rank, bool tucker, bool use_scalar,
                     const torch::TensorOptions& options) {
  const int64_t O = layer.out_features, I = layer.in_features;
  Weights w;
  if (lora::uses_tucker(layer, tucker)) {
    std::vector<int64_t> t{rank, rank};
    t.insert(t.end(), layer.kernel.begin(), layer.kernel.end());
    w.t1 = torch::empty(t, options).normal_(0, 0.1);
    w.t2 = torch::empty(t, options).normal_(0, 0.1);
    w.w1a = torch::empty({rank, O}, options).normal_(0, 0.1);
    w.w1b = torch::empty({rank, I}, options).normal_(0, 1);
    w.w2a = torch::empty({rank, O}, options);
    w.w2b = torch::empty({rank, I}, options).normal_(0, 1);
  } else {
    const int64_t Ik = I * layer.kernel_numel();
    w.w1a = torch::empty({O, rank}, options).normal_(0, 0.1);
    w.w1b = torch::empty({rank, Ik}, options).normal_(0, 1);
    w.w2a = torch::empty({O, rank}, options);
    w.w2b = torch::empty({rank, Ik}, options).normal_(0, 1);
  }
  if (use_scalar)
    w.w2a.normal_(0, 0.1);
  else
    w.w2a.zero_();
  return w;
}

}  // namespace lycoris::functional::loha
