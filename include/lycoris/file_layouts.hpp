// The file layouts of the low-rank algorithms (docs/format.md#key-order): the one writer of each, shared by the
// adapters' file_tensors() (src/modules/<algo>.cpp, where they are defined) and by the tools that write such
// modules without an adapter object (extract, resize). A format-level header, so tools need no module header.
#pragma once
#include <torch/types.h>

#include "lycoris/adapter.hpp"
#include "lycoris/functional/loha.hpp"
#include "lycoris/functional/lokr.hpp"
#include "lycoris/functional/lora.hpp"

namespace lycoris {

// The file's tensors of a LoRA module in key order (docs/format.md#key-order): dora_scale (when defined), alpha,
// lora_up.weight, lora_down.weight, lora_mid.weight (Tucker), detached. The one writer of this layout: LoRA's
// file_tensors() (its sparse-bias keys follow), extract and resize.
NamedTensors lora_file_tensors(const functional::lora::Weights& weights, const torch::Tensor& alpha,
                               const torch::Tensor& dora_scale = {});

// The file's tensors of a LoHa module in key order (docs/format.md#key-order): alpha, dora_scale (when defined),
// hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1/hada_t2 (Tucker), detached. The one writer of this layout:
// LoHa's file_tensors() and extract.
NamedTensors loha_file_tensors(const functional::loha::Weights& weights, const torch::Tensor& alpha,
                               const torch::Tensor& dora_scale = {});

// The file's tensors of a LoKr module in key order (docs/format.md#key-order): alpha, dora_scale (when defined),
// then whichever of lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2 are defined, detached.
// The one writer of this layout: LoKr's file_tensors() and extract.
NamedTensors lokr_file_tensors(const functional::lokr::Weights& weights, const torch::Tensor& alpha,
                               const torch::Tensor& dora_scale = {});

}  // namespace lycoris
