#include "lycoris/modules/dylora.hpp"

#include <torch/torch.h>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "modules/common.hpp"

namespace lycoris {

namespace F = functional;

DyLoRAImpl::DyLoRAImpl(LayerSpec layer, AdapterOptions options)
    : LowRankAdapter("dylora", std::move(layer), std::move(options)) {
  check_low_rank_options(layer_, options_, "dylora");
  if (options_.block_size() < 1 || options_.rank() % options_.block_size() != 0)
    throw OptionError("dylora on " + layer_.describe() + ": rank " + std::to_string(options_.rank()) +
                      " is not a multiple of block_size " + std::to_string(options_.block_size()));
  // DyLoRA has no Tucker, DoRA, scalar nor neuron / rank dropout (docs/training.md#dropout)
  options_.tucker(false).dora(false).use_scalar(false).dropout(0).rank_dropout(0);
  block_size_ = options_.block_size();
  alpha_ = options_.alpha() == 0 ? static_cast<double>(options_.rank()) : options_.alpha();  // raw alpha
  auto w = F::lora::init_weights(layer_, options_.rank(), false, false);
  lora_down = register_parameter("lora_down", w.down);
  lora_up = register_parameter("lora_up", w.up);
  setup_common(w.up.options(), {});
  on_step();  // the block trained until the network's first step
}

DyLoRAImpl::DyLoRAImpl(LayerSpec layer, AdapterOptions options, F::lora::Weights w, double alpha)
    : LowRankAdapter("dylora", std::move(layer), std::move(options)) {
  begin_loaded(alpha);
  options_.tucker(false).dropout(0).rank_dropout(0);
  lora_down = register_parameter("lora_down", w.down);
  lora_up = register_parameter("lora_up", w.up);
  setup_common(w.up.options(), {});
  block_size_ = rank() % options_.block_size() == 0 ? options_.block_size() : rank();
  options_.rank(rank()).alpha(alpha_).block_size(block_size_);
  blocks_ = rank() / block_size_;
}

void DyLoRAImpl::on_step() { blocks_ = torch::randint(1, num_blocks() + 1, {1}).item<int64_t>(); }

void DyLoRAImpl::set_active_blocks(int64_t n) {
  if (n < 1 || n > num_blocks())
    throw OptionError("dylora on " + layer_.describe() + ": active blocks must be in [1, " +
                      std::to_string(num_blocks()) + "], got " + std::to_string(n));
  blocks_ = n;
}

void DyLoRAImpl::set_step_state(const std::vector<int64_t>& state) {
  if (state.size() != 1)
    throw OptionError("dylora on " + layer_.describe() + ": its per-step state is one block count, got " +
                      std::to_string(state.size()) + " value(s)");
  set_active_blocks(state[0]);
}

torch::Tensor DyLoRAImpl::raw_diff() {
  if (!is_training()) return F::lora::diff_weight(layer_, {lora_down, lora_up, {}}, alpha_ / rank());
  const int64_t used = blocks_ * block_size_, fixed = used - block_size_;
  // blocks before the last used one are constants; only the last used block gets gradient
  auto down = torch::cat({lora_down.slice(0, 0, fixed).detach(), lora_down.slice(0, fixed, used)});
  auto up = torch::cat({lora_up.slice(1, 0, fixed).detach(), lora_up.slice(1, fixed, used)}, 1);
  return F::lora::diff_weight(layer_, {down, up, {}}, alpha_ / static_cast<double>(used));
}

NamedTensors DyLoRAImpl::file_tensors(int64_t r) const {
  if (r < 1 || r > rank() || r % block_size_ != 0)
    throw OptionError("dylora: cannot save at rank " + std::to_string(r) + " (full rank " + std::to_string(rank()) +
                      ", block size " + std::to_string(block_size_) + ")");
  // conv lora_up written (O, r, 1, …) — loadable by every LoRA reader (docs/loaders.md#q23-dylora fix)
  return {{"alpha", torch::scalar_tensor(alpha_, torch::kFloat32)},
          {"lora_up.weight", lora_up.slice(1, 0, r).detach()},
          {"lora_down.weight", lora_down.slice(0, 0, r).detach()}};
}

NamedTensors DyLoRAImpl::file_tensors() const { return file_tensors(rank()); }

Algorithm dylora_algorithm() {
  Algorithm a;
  a.name = "dylora";
  a.suffixes = {"lora_up.weight", "lora_down.weight", "alpha"};
  a.detect = nullptr;  // never detected: DyLoRA files are LoRA files (docs/format.md#detection)
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    F::expect_keys(t, {"lora_up.weight", "lora_down.weight", "alpha"}, module, "dylora");
    auto f = read_lora_file(module, t, layer);
    return std::make_shared<DyLoRAImpl>(layer, AdapterOptions().algo("dylora"), f.weights, f.alpha);
  };
  a.create = create_adapter<DyLoRAImpl>;
  a.rank = [](const TensorMap& t) { return stored_size(t, {"lora_down.weight"}); };
  a.supports = supports_weight_layer;
  a.options = {"block_size"};
  a.peft_refusal = peft_lacks("dylora", "LoRA-family files have no such tensors");
  return a;
}

}  // namespace lycoris
