#include "lycoris/modules/diag_oft.hpp"

#include <torch/torch.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/diag_oft.hpp"
#include "modules/common.hpp"

namespace lycoris {

namespace fn = functional;

DiagOFTImpl::DiagOFTImpl(const LayerSpec& layer, const AdapterOptions& options)
    : OFTAdapter("diag-oft", layer, options,
                 [&] { return fn::diag_oft::init_weights(layer, options.rank(), options.rescaled()); }) {}

DiagOFTImpl::DiagOFTImpl(const LayerSpec& layer, const torch::Tensor& blocks, const torch::Tensor& rs,
                         const torch::Tensor& alpha)
    : OFTAdapter("diag-oft", layer, blocks, rs, alpha) {}

torch::Tensor DiagOFTImpl::apply_weight(const torch::Tensor& W, double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return W;
  return fn::diag_oft::apply_weight(W, oft_blocks, rescale, constraint_, m, dropout());
}

torch::Tensor DiagOFTImpl::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                          double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return layer_forward(x, layer_, W, b);
  return fn::diag_oft::bypass_forward(x, layer_, W, b, oft_blocks, rescale, constraint_, m, dropout());
}

Algorithm diag_oft_algorithm() {
  Algorithm a;
  a.name = "diag-oft";
  a.aliases = {"oft", "diag_oft"};
  a.suffixes = {"oft_blocks", "rescale", "alpha"};
  a.detect = [](const TensorMap& t) {
    auto b = fn::optional(t, "oft_blocks");
    return b.defined() && b.dim() == 3;
  };
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    const auto& blocks = check_oft_file("diag-oft", module, t, layer);
    const int64_t N = blocks.dim() == 3 ? blocks.size(0) : 0, S = blocks.dim() == 3 ? blocks.size(1) : 0;
    if (blocks.dim() != 3 || blocks.size(2) != S || S < 1 || N * S != layer.out_features)
      throw ShapeError(module + ".oft_blocks: expected (N, S, S) with N·S = " + std::to_string(layer.out_features) +
                       " output rows of " + layer.describe() + ", got " + fn::shape_str(blocks.sizes()));
    return std::make_shared<DiagOFTImpl>(layer, blocks, fn::optional(t, "rescale"), fn::optional(t, "alpha"));
  };
  a.create = create_adapter<DiagOFTImpl>;
  a.rank = [](const TensorMap& t) -> int64_t {
    auto b = fn::optional(t, "oft_blocks");
    return b.defined() && b.dim() == 3 ? b.size(-1) : 0;
  };
  a.supports = supports_weight_layer;
  a.options = {"constraint", "rescaled", "rank_dropout"};
  a.traits = oft_traits;
  a.peft_refusal = peft_lacks(a.name, "OFT/BOFT rotate the input side with other tensors");
  return a;
}

}  // namespace lycoris
