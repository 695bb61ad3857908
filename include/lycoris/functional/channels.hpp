// Ops on the channel axis of a layer's input or output (the last axis for Linear and norms, axis 1 of a
// batched conv activation, axis 0 of an unbatched one). Used by the algorithms that scale or rotate
// channels instead of adding a low-rank ΔW: (IA)^3, Diag-OFT, BOFT.
#pragma once
#include <torch/types.h>

#include <functional>

#include "lycoris/layer.hpp"

namespace lycoris::functional {

// Index of the channel axis of an activation with `ndim` dims for `layer`.
int64_t channel_axis(const LayerSpec& layer, int64_t ndim);
// y ⊙ v with the vector v (C,) broadcast along y's channel axis.
torch::Tensor scale_channels(const torch::Tensor& y, const LayerSpec& layer, const torch::Tensor& v);
// y + b with the vector b (C,) broadcast along y's channel axis (a layer's bias).
torch::Tensor add_channels(const torch::Tensor& y, const LayerSpec& layer, const torch::Tensor& b);
// f applied to y viewed as (C, rest): the channel axis moved first and the others flattened; the result
// (C, rest) is put back into y's layout. f acts on rows the way a weight-space op acts on W's rows.
torch::Tensor map_channel_rows(const torch::Tensor& y, const LayerSpec& layer,
                               const std::function<torch::Tensor(const torch::Tensor&)>& f);

}  // namespace lycoris::functional
