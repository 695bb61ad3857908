// Drop-in bypass layers (lycoris/nn/layers.hpp).
#include "lycoris/nn/layers.hpp"

#include <torch/torch.h>

#include <algorithm>

namespace lycoris::nn {

void BypassHost::attach(const void* owner, AdapterPtr adapter, std::shared_ptr<const double> multiplier) {
  detach(owner);
  attachments_.push_back({owner, std::move(adapter), std::move(multiplier)});
}

void BypassHost::detach(const void* owner) {
  attachments_.erase(std::remove_if(attachments_.begin(), attachments_.end(),
                                    [&](const Attachment& a) { return a.owner == owner; }),
                     attachments_.end());
}

torch::Tensor BypassHost::forward_bypass(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                         const std::function<torch::Tensor()>& base) {
  if (attachments_.empty()) return base();
  if (attachments_.size() == 1) {
    const auto& a = attachments_.front();
    return a.adapter->bypass_forward(x, W, b, *a.multiplier);
  }
  // stacked adapters each act on the layer's own output (docs/training.md#stacking): y = org(x) + Σ (y_i − org(x))
  auto y = base();
  auto out = y;
  for (const auto& a : attachments_) out = out + (a.adapter->bypass_forward(x, W, b, *a.multiplier) - y);
  return out;
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  return forward_bypass(x, weight, bias, [&] { return torch::nn::LinearImpl::forward(x); });
}

torch::Tensor Conv1dImpl::forward(const torch::Tensor& x) {
  return forward_bypass(x, weight, bias, [&] { return torch::nn::Conv1dImpl::forward(x); });
}

torch::Tensor Conv2dImpl::forward(const torch::Tensor& x) {
  return forward_bypass(x, weight, bias, [&] { return torch::nn::Conv2dImpl::forward(x); });
}

torch::Tensor Conv3dImpl::forward(const torch::Tensor& x) {
  return forward_bypass(x, weight, bias, [&] { return torch::nn::Conv3dImpl::forward(x); });
}

}  // namespace lycoris::nn
