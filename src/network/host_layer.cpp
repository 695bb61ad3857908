// Host views (lycoris/host_layer.hpp) of torch::nn models: one table of the layer types a network adapts.
#include "lycoris/host_layer.hpp"

#include <torch/torch.h>

#include <functional>
#include <type_traits>
#include <unordered_set>

#include "lycoris/network.hpp"
#include "lycoris/nn/layers.hpp"

namespace lycoris {

std::vector<std::pair<std::string, HostModulePtr>> preorder(const HostModulePtr& root) {
  std::vector<std::pair<std::string, HostModulePtr>> out;
  std::unordered_set<const void*> seen;
  std::function<void(const std::string&, const HostModulePtr&)> visit = [&](const std::string& path,
                                                                            const HostModulePtr& m) {
    if (!seen.insert(m->identity()).second) return;
    out.emplace_back(path, m);
    for (const auto& [name, child] : m->children()) visit(path.empty() ? name : path + "." + name, child);
  };
  visit("", root);
  return out;
}

std::string module_type_name(const std::string& demangled) {
  // strip the namespace (the last "::" outside template arguments), then a trailing "Impl"
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i + 1 < demangled.size(); ++i) {
    const char c = demangled[i];
    if (c == '<') ++depth;
    if (c == '>') --depth;
    if (depth == 0 && c == ':' && demangled[i + 1] == ':') start = i + 2;
  }
  std::string name = demangled.substr(start);
  if (name.size() > 4 && name.compare(name.size() - 4, 4, "Impl") == 0) name.resize(name.size() - 4);
  return name;
}

namespace {

// ---- the LayerSpec of each supported torch::nn layer type; false (and `why`) for unsupported settings

template <typename Array>
std::vector<int64_t> to_vec(const Array& a) {
  return std::vector<int64_t>(a->begin(), a->end());
}

bool linear_spec(const torch::nn::LinearImpl& l, LayerSpec& out, std::string*) {
  out = LayerSpec::linear(l.options.in_features(), l.options.out_features(), l.bias.defined());
  return true;
}

template <size_t D, typename Impl>
bool conv_spec(const Impl& conv, LayerSpec& out, std::string* why) {
  const auto& o = conv.options;
  auto kernel = to_vec(o.kernel_size()), dilation = to_vec(o.dilation());
  std::vector<int64_t> padding;
  if (const auto* p = c10::get_if<torch::ExpandingArray<D>>(&o.padding())) {
    padding = to_vec(*p);
  } else if (c10::get_if<torch::enumtype::kValid>(&o.padding())) {
    padding.assign(D, 0);
  } else {  // "same": symmetric only when dilation·(k−1) is even
    for (size_t i = 0; i < D; ++i) {
      const int64_t total = dilation[i] * (kernel[i] - 1);
      if (total % 2) {
        if (why) *why = conv.name() + " with padding 'same' and an even kernel (asymmetric padding)";
        return false;
      }
      padding.push_back(total / 2);
    }
  }
  out = LayerSpec::conv(o.in_channels(), o.out_channels(), kernel, to_vec(o.stride()), padding, dilation, o.groups(),
                        conv.bias.defined());
  return true;
}

bool layer_norm_spec(const torch::nn::LayerNormImpl& n, LayerSpec& out, std::string* why) {
  if (!n.options.elementwise_affine() || n.options.normalized_shape().size() != 1) {
    if (why) *why = "LayerNorm without elementwise affine weights over exactly one axis";
    return false;
  }
  out = LayerSpec::layer_norm(n.options.normalized_shape()[0], n.options.eps(), n.bias.defined());
  return true;
}

bool group_norm_spec(const torch::nn::GroupNormImpl& g, LayerSpec& out, std::string* why) {
  if (!g.options.affine()) {
    if (why) *why = "GroupNorm without affine weights";
    return false;
  }
  out = LayerSpec::group_norm(g.options.num_groups(), g.options.num_channels(), g.options.eps(), g.bias.defined());
  return true;
}

// ---- the view: torch::nn layers read their `weight` / `bias` members in forward, and register_parameter
// keeps its own handle, so binding assigns the members and leaves the registered parameters alone

template <typename Impl>
class TorchLayer final : public HostLayer {
 public:
  TorchLayer(std::shared_ptr<torch::nn::Module> module, Impl& layer, LayerSpec spec)
      : HostLayer(std::move(spec)), module_(std::move(module)), layer_(layer) {}

  std::string type_name() const override { return module_type_name(module_->name()); }
  const void* identity() const override { return module_.get(); }
  torch::Tensor weight() const override { return layer_.weight; }
  torch::Tensor bias() const override { return layer_.bias; }
  void bind(const torch::Tensor& W, const torch::Tensor& b) override {
    layer_.weight = W;
    layer_.bias = b;
  }
  void restore(const torch::Tensor& W0, const torch::Tensor& b0) override { bind(W0, b0); }
  bool add_bias(const torch::Tensor& bias, bool requires_grad) override {
    bool registered = true;
    try {
      module_->register_parameter("bias", bias, requires_grad);
    } catch (const std::exception&) {  // libtorch layers built without bias hold an empty "bias" slot already
      registered = false;
    }
    layer_.bias = bias;
    return registered;
  }
  // Only drop-in layers ask adapters in forward, and the adapters reproduce zero padding only.
  nn::BypassHost* bypass() override {
    constexpr bool conv = std::is_same_v<Impl, torch::nn::Conv1dImpl> || std::is_same_v<Impl, torch::nn::Conv2dImpl> ||
                          std::is_same_v<Impl, torch::nn::Conv3dImpl>;
    if constexpr (conv)
      if (!c10::get_if<torch::enumtype::kZeros>(&layer_.options.padding_mode())) return nullptr;
    return dynamic_cast<nn::BypassHost*>(module_.get());
  }

 private:
  std::shared_ptr<torch::nn::Module> module_;
  Impl& layer_;
};

// One row of the table: the torch::nn type (subclasses included), its LayerSpec and its view.
struct TorchLayerType {
  std::function<bool(const torch::nn::Module&)> is;
  std::function<bool(const torch::nn::Module&, LayerSpec&, std::string* why)> spec;
  std::function<HostLayerPtr(std::shared_ptr<torch::nn::Module>, LayerSpec)> view;
};

template <typename Impl>
TorchLayerType layer_type(bool (*spec)(const Impl&, LayerSpec&, std::string*)) {
  return {[](const torch::nn::Module& m) { return dynamic_cast<const Impl*>(&m) != nullptr; },
          [spec](const torch::nn::Module& m, LayerSpec& out, std::string* why) {
            return spec(dynamic_cast<const Impl&>(m), out, why);
          },
          [](std::shared_ptr<torch::nn::Module> m, LayerSpec s) -> HostLayerPtr {
            auto& layer = dynamic_cast<Impl&>(*m);
            return std::make_shared<TorchLayer<Impl>>(std::move(m), layer, std::move(s));
          }};
}

// The torch::nn layers a network adapts (the first row whose type a module has decides).
const std::vector<TorchLayerType>& torch_layer_types() {
  static const std::vector<TorchLayerType> types = {
      layer_type<torch::nn::LinearImpl>(linear_spec),
      layer_type<torch::nn::Conv1dImpl>(conv_spec<1, torch::nn::Conv1dImpl>),
      layer_type<torch::nn::Conv2dImpl>(conv_spec<2, torch::nn::Conv2dImpl>),
      layer_type<torch::nn::Conv3dImpl>(conv_spec<3, torch::nn::Conv3dImpl>),
      layer_type<torch::nn::LayerNormImpl>(layer_norm_spec),
      layer_type<torch::nn::GroupNormImpl>(group_norm_spec),
  };
  return types;
}

const TorchLayerType* torch_layer_type(const torch::nn::Module& module) {
  for (const auto& t : torch_layer_types())
    if (t.is(module)) return &t;
  return nullptr;
}

class TorchModule final : public HostModule {
 public:
  explicit TorchModule(std::shared_ptr<torch::nn::Module> module) : module_(std::move(module)) {}

  std::string type_name() const override { return module_type_name(module_->name()); }
  const void* identity() const override { return module_.get(); }
  std::vector<std::pair<std::string, HostModulePtr>> children() const override {
    std::vector<std::pair<std::string, HostModulePtr>> out;
    for (const auto& child : module_->named_children()) out.emplace_back(child.key(), host_module(child.value()));
    return out;
  }
  HostLayerPtr layer(std::string* why) const override {
    const auto* type = torch_layer_type(*module_);
    LayerSpec spec;
    if (!type || !type->spec(*module_, spec, why)) return nullptr;
    return type->view(module_, std::move(spec));
  }
  std::shared_ptr<torch::nn::Module> torch_module() const override { return module_; }

 private:
  std::shared_ptr<torch::nn::Module> module_;
};

}  // namespace

HostModulePtr host_module(std::shared_ptr<torch::nn::Module> module) {
  return std::make_shared<TorchModule>(std::move(module));
}

bool layer_spec_of(const torch::nn::Module& module, LayerSpec& out, std::string* why) {
  const auto* type = torch_layer_type(module);
  return type && type->spec(module, out, why);
}

std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> named_modules_preorder(
    const std::shared_ptr<torch::nn::Module>& model) {
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> out;
  for (const auto& [path, m] : preorder(host_module(model))) out.emplace_back(path, m->torch_module());
  return out;
}

}  // namespace lycoris
