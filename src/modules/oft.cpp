#include "lycoris/modules/oft.hpp"

#include <torch/torch.h>

#include <cmath>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/diag_oft.hpp"
#include "modules/common.hpp"

namespace lycoris {

namespace fn = functional;

OFTAdapter::OFTAdapter(const std::string& algo, const LayerSpec& layer, const AdapterOptions& options,
                       const std::function<std::pair<torch::Tensor, torch::Tensor>()>& init)
    : AdapterImpl(algo, layer, options), constraint_(options.constraint()) {
  check_oft_options(algo, layer_, options_);
  auto [blocks, rs] = init();
  oft_blocks = register_parameter("oft_blocks", blocks);
  if (rs.defined()) rescale = register_parameter("rescale", rs);
  alpha_tensor_ = torch::tensor(constraint_, torch::kFloat32);
}

OFTAdapter::OFTAdapter(const std::string& algo, const LayerSpec& layer, const torch::Tensor& blocks,
                       const torch::Tensor& rs, const torch::Tensor& alpha)
    : AdapterImpl(algo, layer, AdapterOptions().algo(algo).rank(blocks.size(-1)).rescaled(rs.defined())),
      constraint_(alpha.defined() ? fn::scalar_value(alpha, algo, "alpha") : 0.0) {
  oft_blocks = register_parameter("oft_blocks", fn::owned_float(blocks));
  if (rs.defined()) rescale = register_parameter("rescale", fn::owned_float(rs));
  alpha_tensor_ =
      alpha.defined() ? alpha.detach().clone().to(torch::kCPU) : torch::tensor(constraint_, torch::kFloat32);
  options_.constraint(constraint_);
}

NamedTensors OFTAdapter::file_tensors() const {
  NamedTensors out{{"oft_blocks", oft_blocks.detach()}};
  if (rescale.defined()) out.emplace_back("rescale", rescale.detach());
  out.emplace_back("alpha", alpha_tensor_.detach());
  return out;
}

Traits oft_traits(const std::string& module, const TensorMap& t) {
  Traits out;
  if (t.count("rescale")) out.push_back("rescale");
  const double alpha = alpha_or_nan(module, t);
  if (std::isnan(alpha) || alpha == 0) {
    out.push_back("constraint-zero");
  } else if (auto blocks = fn::optional(t, "oft_blocks"); blocks.defined() && blocks.dim() >= 3) {
    // ‖Q‖ of all blocks (and stages) together, Q = B − Bᵀ (docs/loaders.md#q20-oft-constraint)
    const auto b = blocks.to(torch::kFloat64);
    const double q = (b - b.transpose(-1, -2)).norm().item<double>();
    if (q + 1e-8 > alpha) out.push_back("constraint-below-q");
  }
  return out;
}

void check_oft_options(const std::string& algo, const LayerSpec& layer, const AdapterOptions& o) {
  check_options(algo, layer, o, Hosts::Weights, /*needs_rank=*/false);
  const std::string who = algo + " on " + layer.describe() + ": ";
  if (o.rank() == 0 || o.rank() < -1)
    throw OptionError(who + "rank (block size bound) must be positive or -1, got " + std::to_string(o.rank()));
  if (!(o.constraint() >= 0)) throw OptionError(who + "constraint must be >= 0, got " + std::to_string(o.constraint()));
}

const torch::Tensor& check_oft_file(const std::string& algo, const std::string& module, const TensorMap& t,
                                    const LayerSpec& layer) {
  if (auto why = fn::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": " + algo + ": " + why);
  fn::expect_keys(t, {"oft_blocks", "rescale", "alpha"}, module, algo);
  const auto& blocks = fn::require(t, "oft_blocks", module);
  auto rs = fn::optional(t, "rescale");
  if (rs.defined()) fn::expect_shape(rs, fn::diag_oft::rescale_shape(layer), module, "rescale", "one per output row");
  auto alpha = fn::optional(t, "alpha");
  if (alpha.defined()) fn::scalar_value(alpha, module, "alpha");
  return blocks;
}

}  // namespace lycoris
