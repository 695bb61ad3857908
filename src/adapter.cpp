#include "lycoris/adapter.hpp"

#include <torch/torch.h>

#include <limits>
#include <string>
#include <vector>

#include "lycoris/error.hpp"

namespace lycoris {

AdapterImpl::AdapterImpl(std::string algo, LayerSpec layer, AdapterOptions options)
    : algo_(std::move(algo)), layer_(std::move(layer)), options_(std::move(options)) {}

void AdapterImpl::set_step_state(const std::vector<int64_t>& state) {
  if (!state.empty())
    throw OptionError(algo_ + " on " + layer_.describe() + ": this algorithm keeps no per-step state, got " +
                      std::to_string(state.size()) + " value(s)");
}

torch::Tensor AdapterImpl::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                          double m) {
  return layer_forward(x, layer_, apply_weight(W, m), apply_bias(b, m));
}

double AdapterImpl::alpha() const { return std::numeric_limits<double>::quiet_NaN(); }

std::unique_ptr<RowKernel> AdapterImpl::row_kernel(double, const torch::TensorOptions&, torch::IntArrayRef) const {
  return nullptr;
}

}  // namespace lycoris
