#include "lycoris/modules/lora.hpp"

#include <torch/torch.h>

#include <cmath>

#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/dora.hpp"
#include "modules/common.hpp"

namespace lycoris {

namespace F = functional;

// ---------------------------------------------------------------- file reading

LoRAFile read_lora_file(const std::string& module, const TensorMap& t, const LayerSpec& layer) {
  F::expect_keys(t,
                 {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "bias_indices",
                  "bias_values", "bias_size"},
                 module, "lora");
  if (auto why = F::unsupported_layer(layer); !why.empty()) throw ShapeError(module + ": " + why);
  const auto& up = F::require(t, "lora_up.weight", module);
  const auto& down = F::require(t, "lora_down.weight", module);
  auto mid = F::optional(t, "lora_mid.weight");
  const int64_t O = layer.out_features, I = layer.in_features;
  const size_t nk = layer.kernel.size();
  if (down.dim() < 1) F::expect_shape(down, {-1, I}, module, "lora_down.weight");
  const int64_t r = down.size(0);
  F::expect_rank(r, down, module, "lora_down.weight");
  auto with_kernel = [&](std::vector<int64_t> s, bool unit) {
    for (size_t i = 0; i < nk; ++i) s.push_back(unit ? 1 : layer.kernel[i]);
    return s;
  };
  if (mid.defined()) {
    if (!layer.is_conv())
      throw ShapeError(module + ".lora_mid.weight: Tucker factor on a non-conv layer " + layer.describe());
    F::expect_shape(down, with_kernel({r, I}, true), module, "lora_down.weight", "Tucker down for " + layer.describe());
    F::expect_shape(mid, with_kernel({r, r}, false), module, "lora_mid.weight", "rank " + std::to_string(r));
  } else {
    F::expect_shape(down, with_kernel({r, I}, false), module, "lora_down.weight", "for " + layer.describe());
  }
  // conv up: (O, r, 1, …) or the 2-D (O, r) DyLoRA writes (docs/loaders.md#q23-dylora)
  if (!(layer.is_conv() && up.sizes() == torch::IntArrayRef{O, r}))
    F::expect_shape(up, with_kernel({O, r}, true), module, "lora_up.weight",
                    "rank " + std::to_string(r) + " from lora_down.weight, " + layer.describe());
  LoRAFile f;
  f.weights.down = F::owned_float(down);
  f.weights.up = F::owned_float(up).reshape(with_kernel({O, r}, true));
  if (mid.defined()) f.weights.mid = F::owned_float(mid);
  f.alpha = read_alpha(t, module, r);
  if (auto ds = F::optional(t, "dora_scale"); ds.defined()) {
    F::dora::on_out(ds, layer.weight_shape(), module);
    f.dora_scale = F::owned_float(ds);
  }
  auto bi = F::optional(t, "bias_indices"), bv = F::optional(t, "bias_values"), bs = F::optional(t, "bias_size");
  if (bi.defined() || bv.defined() || bs.defined()) {
    const auto& i = F::require(t, "bias_indices", module);
    const auto& v = F::require(t, "bias_values", module);
    const auto& s = F::require(t, "bias_size", module);
    F::expect_shape(s, {2}, module, "bias_size");
    if (i.dim() != 2 || i.size(0) != 2 || v.dim() != 1 || v.size(0) != i.size(1))
      throw ShapeError(module + ".bias_indices/bias_values: expected (2, nnz) and (nnz,), got " +
                       F::shape_str(i.sizes()) + " and " + F::shape_str(v.sizes()));
    auto size = s.to(torch::kInt64);
    const int64_t rows = size[0].item<int64_t>(), cols = size[1].item<int64_t>();
    if (rows != O || cols != I * layer.kernel_numel())
      throw ShapeError(module + ".bias_size: expected [" + std::to_string(O) + ", " +
                       std::to_string(I * layer.kernel_numel()) + "], got [" + std::to_string(rows) + ", " +
                       std::to_string(cols) + "]");
    auto idx = i.to(torch::kInt64);
    if (idx.numel() > 0 && (idx.min().item<int64_t>() < 0 || idx[0].max().item<int64_t>() >= rows ||
                            idx[1].max().item<int64_t>() >= cols))
      throw ShapeError(module + ".bias_indices: index out of range for bias_size");
    f.bias_indices = i.clone();
    f.bias_values = v.clone();
    f.bias_size = s.clone();
  }
  return f;
}

// ---------------------------------------------------------------- file writing

NamedTensors lora_file_tensors(const F::lora::Weights& w, const torch::Tensor& alpha, const torch::Tensor& dora_scale) {
  NamedTensors out;
  if (dora_scale.defined()) out.emplace_back("dora_scale", dora_scale.detach());
  out.emplace_back("alpha", alpha.detach());
  out.emplace_back("lora_up.weight", w.up.detach());
  out.emplace_back("lora_down.weight", w.down.detach());
  if (w.mid.defined()) out.emplace_back("lora_mid.weight", w.mid.detach());
  return out;
}

// ---------------------------------------------------------------- LoRA

LoRAImpl::LoRAImpl(LayerSpec layer, AdapterOptions options) : LowRankAdapter("lora", std::move(layer), std::move(options)) {
  check_low_rank_options(layer_, options_, "lora");
  alpha_ = stored_alpha(options_);
  setup(F::lora::init_weights(layer_, options_.rank(), options_.tucker(), options_.use_scalar()), {});
}

LoRAImpl::LoRAImpl(LayerSpec layer, AdapterOptions options, F::lora::Weights w, double alpha,
                   torch::Tensor dora_scale_)
    : LowRankAdapter("lora", std::move(layer), std::move(options)) {
  begin_loaded(alpha);
  setup(std::move(w), std::move(dora_scale_));
  record_loaded(rank(), lora_mid.defined());
}

void LoRAImpl::setup(F::lora::Weights w, torch::Tensor ds) {
  lora_down = register_parameter("lora_down", w.down);
  lora_up = register_parameter("lora_up", w.up);
  if (w.mid.defined()) lora_mid = register_parameter("lora_mid", w.mid);
  setup_common(w.up.options(), std::move(ds));
}

void LoRAImpl::set_sparse_bias(torch::Tensor indices, torch::Tensor values, torch::Tensor size) {
  auto dense = torch::sparse_coo_tensor(indices.to(torch::kInt64), values.to(lora_up.scalar_type()),
                                        {size[0].item<int64_t>(), size[1].item<int64_t>()})
                   .to_dense();
  sparse_dense_ = register_buffer("sparse_bias", dense.reshape(layer_.weight_shape()).to(lora_up.device()));
  sparse_keys_ = {{"bias_indices", indices}, {"bias_values", values}, {"bias_size", size}};
}

F::lora::Weights LoRAImpl::weights() const { return {lora_down, lora_up * scalar, lora_mid}; }

torch::Tensor LoRAImpl::raw_diff() {
  auto dw = F::lora::diff_weight(layer_, weights(), scale());
  return sparse_dense_.defined() ? dw + sparse_dense_ : dw;
}

torch::Tensor LoRAImpl::raw_bypass(const torch::Tensor& x, double m) {
  // rank_dropout in bypass drops rank channels (docs/training.md#dropout)
  torch::Tensor mask;
  if (is_training() && options_.rank_dropout() > 0)
    mask = F::keep_mask(rank(), options_.rank_dropout(), options_.rank_dropout_scale(), lora_up.options());
  auto delta = F::lora::bypass_diff(x, layer_, weights(), scale() * m, mask);
  if (sparse_dense_.defined()) delta = delta + F::host_op(x, layer_, (sparse_dense_ * m).to(x.scalar_type()));
  return delta;
}

std::unique_ptr<RowKernel> LoRAImpl::delta_kernel(double m, const torch::TensorOptions& opts, torch::IntArrayRef) const {
  if (lora_mid.defined() || !in_compute(opts, {lora_up, lora_down})) return nullptr;
  const double c = m * scale();
  auto up = F::flat(lora_up * scalar), down = F::flat(lora_down).contiguous();
  // the sparse-bias residual of extracted files: ΔW += dense (unscaled)
  auto sparse = sparse_dense_.defined() ? F::flat(sparse_dense_).to(opts) : torch::Tensor();
  return std::make_unique<RowKernel>(RowKernel{1, [=](const torch::Tensor& Wr, int64_t r0, int64_t r1) {
                                                 Wr.addmm_(up.narrow(0, r0, r1 - r0), down, 1.0, c);
                                                 if (sparse.defined()) Wr.add_(sparse.narrow(0, r0, r1 - r0), m);
                                               }});
}

NamedTensors LoRAImpl::file_tensors() const {
  auto out = lora_file_tensors(weights(), torch::scalar_tensor(alpha_, torch::kFloat32), dora_scale);
  for (const auto& kv : sparse_keys_) out.push_back(kv);
  return out;
}

// ---------------------------------------------------------------- registry entry

Algorithm lora_algorithm() {
  Algorithm a;
  a.name = "lora";
  a.aliases = {"locon"};
  a.suffixes = {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha",
                "dora_scale",     "bias_indices",     "bias_values",     "bias_size"};
  a.detect = [](const TensorMap& t) { return t.count("lora_up.weight") > 0; };
  a.load = [](const std::string& module, const TensorMap& t, const LayerSpec& layer) -> AdapterPtr {
    auto f = read_lora_file(module, t, layer);
    auto m = std::make_shared<LoRAImpl>(layer, AdapterOptions().algo("lora"), f.weights, f.alpha, f.dora_scale);
    if (f.bias_indices.defined()) m->set_sparse_bias(f.bias_indices, f.bias_values, f.bias_size);
    return m;
  };
  a.create = create_adapter<LoRAImpl>;
  a.rank = [](const TensorMap& t) { return stored_size(t, {"lora_down.weight"}); };
  a.supports = supports_weight_layer;
  a.options = low_rank_options();
  a.traits = [](const std::string& module, const TensorMap& t) {
    auto traits = low_rank_traits(module, t, stored_size(t, {"lora_down.weight"}));
    auto down = F::optional(t, "lora_down.weight"), up = F::optional(t, "lora_up.weight");
    add_kind_trait(traits, down);
    if (t.count("lora_mid.weight")) traits.push_back("tucker");
    if (down.defined() && up.defined() && down.dim() > 2 && up.dim() == 2) traits.push_back("conv-up-2d");
    return traits;
  };
  a.to_peft = [](const TensorMap& t, double scale) {
    if (t.count("lora_mid.weight")) return PeftForm{"LoRA with a Tucker core (lora_mid): PEFT LoRA has no mid factor", {}};
    auto form = low_rank_peft_form("lora", t, scale, "lora_up.weight");
    const auto down = F::optional(t, "lora_down.weight");
    const int64_t ndim = down.defined() ? down.dim() : 2;
    for (auto& [suffix, x] : form.tensors) {
      if (suffix == "lora_up.weight" && ndim > 2 && x.dim() == 2) {
        // DyLoRA's 2-D conv lora_up (docs/loaders.md#q23-dylora) → (O, r, 1, …)
        std::vector<int64_t> shape = x.sizes().vec();
        shape.resize(static_cast<size_t>(ndim), 1);
        x = x.reshape(shape);
      }
      if (suffix == "dora_scale") {  // PEFT's magnitude: (O,) for Linear, (1, O, 1, …) for convs
        std::vector<int64_t> shape(static_cast<size_t>(ndim > 2 ? ndim : 1), 1);
        shape[ndim > 2 ? 1 : 0] = x.numel();
        x = x.reshape(shape);
      }
    }
    return form;
  };
  a.from_peft = [](TensorMap& t, double scale) {
    if (auto it = t.find("dora_scale"); it != t.end()) {
      // PEFT's magnitude: (O,) for Linear, (1, O, 1, …) for convs → dora_scale (O, 1, …)
      auto down = F::optional(t, "lora_down.weight");
      std::vector<int64_t> shape(static_cast<size_t>(down.defined() ? down.dim() : 2), 1);
      shape[0] = it->second.numel();
      it->second = it->second.reshape(shape).contiguous();
    }
    low_rank_from_peft(t, scale, stored_size(t, {"lora_down.weight"}), "lora_up.weight");
  };
  return a;
}

}  // namespace lycoris
