#include "lycoris/modules/boft.hpp"

#include <torch/torch.h>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/boft.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/diag_oft.hpp"
#include "modules/common.hpp"
#include "lycoris/modules/diag_oft.hpp"

namespace lycoris {

namespace fn = functional;

// init_weights throws OptionError when no butterfly layout exists (docs/loaders.md#q22-boft-layout)
BOFTImpl::BOFTImpl(const LayerSpec& layer, const AdapterOptions& options)
    : OFTAdapter("boft", layer, options,
                 [&] { return fn::boft::init_weights(layer, options.rank(), options.rescaled()); }) {}

BOFTImpl::BOFTImpl(const LayerSpec& layer, const torch::Tensor& blocks, const torch::Tensor& rs,
                   const torch::Tensor& alpha)
    : OFTAdapter("boft", layer, blocks, rs, alpha) {}

torch::Tensor BOFTImpl::apply_weight(const torch::Tensor& W, double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return W;
  return fn::boft::apply_weight(W, oft_blocks, rescale, constraint_, m);
}

torch::Tensor BOFTImpl::bypass_forward(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                                       double m) {
  if (fn::module_dropped(options_.module_dropout(), is_training())) return layer_forward(x, layer_, W, b);
  return fn::boft::bypass_forward(x, layer_, W, b, oft_blocks, rescale, constraint_, m);
}

Algorithm boft_algorithm() {
  Algorithm a;
  a.name = "boft";
  a.suffixes = {"oft_blocks", "rescale", "alpha"};
  a.detect = [](const TensorMap& t) {
    auto b = fn::optional(t, "oft_blocks");
    return b.defined() && b.dim() == 4;
  };
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    const auto& blocks = check_oft_file("boft", module, t, layer);
    bool ok = blocks.dim() == 4;
    int64_t M = 0, N = 0, S = 0;
    if (ok) {
      M = blocks.size(0), N = blocks.size(1), S = blocks.size(2);
      ok = M >= 1 && M < 62 && blocks.size(3) == S && S >= 2 && S % 2 == 0 && N >= 1 && (N & (N - 1)) == 0 &&
           (int64_t{1} << (M - 1)) == N && N * S == layer.out_features;
    }
    if (!ok)
      throw ShapeError(module + ".oft_blocks: expected (M, N, S, S) with S even, N = 2^(M-1) and N·S = " +
                       std::to_string(layer.out_features) + " output rows of " + layer.describe() + ", got " +
                       fn::shape_str(blocks.sizes()));
    return std::make_shared<BOFTImpl>(layer, blocks, fn::optional(t, "rescale"), fn::optional(t, "alpha"));
  };
  a.create = create_adapter<BOFTImpl>;
  a.rank = [](const TensorMap& t) -> int64_t {
    auto b = fn::optional(t, "oft_blocks");
    return b.defined() && b.dim() == 4 ? b.size(-1) : 0;
  };
  a.supports = supports_weight_layer;
  a.options = {"constraint", "rescaled"};
  a.traits = oft_traits;
  a.peft_refusal = peft_lacks(a.name, "OFT/BOFT rotate the input side with other tensors");
  return a;
}

}  // namespace lycoris
