// Drop-in layers for bypass mode: lycoris::nn::Linear / Conv1d / Conv2d / Conv3d are torch::nn's layers
// (same constructors and options, same parameters, type names "Linear", "Conv2d", … for presets) whose
// forward also asks the adapters attached to them by a bypass-mode network:
//   y = op(x, W, b) + Σ_adapters δ(x)   (one adapter: exactly AdapterImpl::bypass_forward(x, W, b, m))
// without materialising ΔW where the algorithm allows it. With nothing attached the forward is torch's.
// They also work in rebuild mode (their forward reads the `weight` member like torch's).
// Use them by type in your model (a torch::nn::Linear holder pointing at one would call torch's forward).
#pragma once
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <memory>
#include <vector>

#include "lycoris/adapter.hpp"

namespace lycoris::nn {

// The adapter list of a drop-in layer.
class BypassHost {
 public:
  virtual ~BypassHost() = default;
  // Attaches (or replaces) the adapter of network `owner`; `multiplier` is read at every forward.
  void attach(const void* owner, AdapterPtr adapter, std::shared_ptr<const double> multiplier);
  void detach(const void* owner);
  bool attached() const { return !attachments_.empty(); }

 protected:
  // op(x, W, b) plus every attached adapter's bypass contribution; `base` computes op(x, W, b).
  torch::Tensor forward_bypass(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                               const std::function<torch::Tensor()>& base);

 private:
  struct Attachment {
    const void* owner;
    AdapterPtr adapter;
    std::shared_ptr<const double> multiplier;
  };
  std::vector<Attachment> attachments_;
};

class LinearImpl : public torch::nn::LinearImpl, public BypassHost {
 public:
  using torch::nn::LinearImpl::LinearImpl;
  torch::Tensor forward(const torch::Tensor& x);
};
TORCH_MODULE(Linear);

class Conv1dImpl : public torch::nn::Conv1dImpl, public BypassHost {
 public:
  using torch::nn::Conv1dImpl::Conv1dImpl;
  torch::Tensor forward(const torch::Tensor& x);
};
TORCH_MODULE(Conv1d);

class Conv2dImpl : public torch::nn::Conv2dImpl, public BypassHost {
 public:
  using torch::nn::Conv2dImpl::Conv2dImpl;
  torch::Tensor forward(const torch::Tensor& x);
};
TORCH_MODULE(Conv2d);

class Conv3dImpl : public torch::nn::Conv3dImpl, public BypassHost {
 public:
  using torch::nn::Conv3dImpl::Conv3dImpl;
  torch::Tensor forward(const torch::Tensor& x);
};
TORCH_MODULE(Conv3d);

}  // namespace lycoris::nn
