// Host views (lycoris/host_layer.hpp) of TorchScript modules (lycoris/jit.hpp, docs/training.md#torchscript):
// one table of the torch.nn layer classes a network adapts, their settings from the class constants of a
// scripted layer or from the op of a traced one, and one probe of what the model's code reads.
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/torch.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "lycoris/error.hpp"
#include "lycoris/jit.hpp"

namespace lycoris {

// Named: in the unity build this file shares a translation unit with host_layer.cpp's anonymous namespace.
namespace jit_view {
namespace {

using torch::jit::Module;
using torch::jit::Node;
using torch::jit::Value;

std::string join(const std::string& path, const std::string& name) { return path.empty() ? name : path + "." + name; }

// The class name without the "__torch__" root and the "___torch_mangle_N" atoms TorchScript adds to tell
// apart classes of one name (every traced module gets its own): "torch.nn.modules.linear.Linear".
std::string class_name(const Module& m) {
  const auto& name = m.type()->name();
  if (!name) return "";
  std::string out;
  const auto& atoms = name->atoms();
  for (size_t i = 0; i < atoms.size(); ++i) {
    if ((i == 0 && atoms[i] == "__torch__") || atoms[i].rfind("___torch_mangle_", 0) == 0) continue;
    out = join(out, atoms[i]);
  }
  return out;
}

std::string last_atom(const std::string& dotted) {
  const auto dot = dotted.rfind('.');
  return dot == std::string::npos ? dotted : dotted.substr(dot + 1);
}

// ---- what the model's code reads: one probe per host tree

// Every attribute path a method of the root reads through prim::GetAttr chains from `self`, with the
// calls of submodules inlined ("block.attn.to_q.weight"), and the submodules whose object the code hands
// to something it could not inline (everything under them counts as read).
class Probe {
 public:
  explicit Probe(Module root) : root_(std::move(root)) {}

  bool reads(const std::string& path) const {
    std::call_once(once_, [this] { run(); });
    if (read_.count(path)) return true;
    for (const auto& e : escaped_)
      if (e.empty() || path.rfind(e + ".", 0) == 0) return true;
    return false;
  }

 private:
  void run() const {
    for (const auto& method : root_.get_methods()) {
      auto graph = method.graph()->copy();
      torch::jit::Inline(*graph);
      std::unordered_map<const Value*, std::string> paths = {{graph->inputs().at(0), ""}};
      walk(graph->block(), paths);
    }
  }
  void walk(const torch::jit::Block* block, std::unordered_map<const Value*, std::string>& paths) const {
    for (const Node* node : block->nodes()) {
      if (node->kind() == c10::prim::GetAttr) {
        if (auto it = paths.find(node->input(0)); it != paths.end()) {
          const auto path = join(it->second, node->s(c10::attr::name));
          read_.insert(path);
          if (node->output()->type()->cast<c10::ClassType>()) paths[node->output()] = path;
          continue;
        }
      }
      // writing an attribute (a buffer update) is no reason to doubt the chains
      if (node->kind() != c10::prim::SetAttr)
        for (const Value* in : node->inputs())
          if (auto it = paths.find(in); it != paths.end()) escaped_.push_back(it->second);
      for (const auto* sub : node->blocks()) walk(sub, paths);
    }
  }

  Module root_;
  mutable std::once_flag once_;
  mutable std::unordered_set<std::string> read_;
  mutable std::vector<std::string> escaped_;
};

// ---- settings: class constants (a scripted torch.nn layer keeps its __constants__), else the arguments
// of the op its traced forward calls with its own weight

std::optional<c10::IValue> constant(const Module& m, const std::string& name) {
  if (auto c = m.type()->findConstant(name)) return *c;  // (c10::optional would convert to an IValue None)
  return std::nullopt;
}

// The value of a graph input that is a constant or a list of constants.
std::optional<c10::IValue> value_of(const Value* v) {
  if (auto iv = torch::jit::toIValue(v)) return *iv;
  if (v->node()->kind() != c10::prim::ListConstruct) return std::nullopt;
  c10::List<int64_t> list;
  for (const Value* in : v->node()->inputs()) {
    auto iv = torch::jit::toIValue(in);
    if (!iv || !iv->isInt()) return std::nullopt;
    list.push_back(iv->toInt());
  }
  return c10::IValue(list);
}

// int, int list or tuple of ints, repeated to `n` entries when a single int.
std::optional<std::vector<int64_t>> ints(const std::optional<c10::IValue>& v, size_t n) {
  if (!v) return std::nullopt;
  std::vector<int64_t> out;
  if (v->isInt()) return std::vector<int64_t>(n, v->toInt());
  if (v->isIntList()) {
    for (int64_t i : v->toIntList()) out.push_back(i);
  } else if (v->isTuple()) {
    for (const auto& e : v->toTupleRef().elements()) {
      if (!e.isInt()) return std::nullopt;
      out.push_back(e.toInt());
    }
  } else {
    return std::nullopt;
  }
  if (out.size() == 1 && n > 1) out.assign(n, out[0]);
  if (out.size() != n) return std::nullopt;
  return out;
}

// The op of the module's forward that takes `self.weight` (a traced layer's forward is one such call).
const Node* weight_op(const Module& m, std::initializer_list<const char*> kinds) {
  const auto method = m.find_method("forward");
  if (!method) return nullptr;
  const auto graph = method->graph();
  const Value* self = graph->inputs().at(0);
  auto is_weight = [&](const Value* v) {
    const Node* n = v->node();
    return n->kind() == c10::prim::GetAttr && n->input(0) == self && n->s(c10::attr::name) == "weight";
  };
  for (const Node* node : graph->nodes())
    for (const char* k : kinds)
      if (node->kind() == c10::Symbol::fromQualString(k) &&
          std::any_of(node->inputs().begin(), node->inputs().end(), is_weight))
        return node;
  return nullptr;
}

torch::Tensor tensor_attr(const Module& m, const std::string& name) {
  if (!m.hasattr(name)) return {};
  const auto v = m.attr(name);
  return v.isTensor() ? v.toTensor() : torch::Tensor();
}

const char* const kUntraced =
    "its forward was not traced (the module was not called while tracing), so its settings are unknown";

bool linear_spec(const Module& m, LayerSpec& out, std::string* why) {
  const auto W = tensor_attr(m, "weight");
  if (!W.defined() || W.dim() != 2) {
    if (why) *why = "Linear without a 2-D weight";
    return false;
  }
  out = LayerSpec::linear(W.size(1), W.size(0), tensor_attr(m, "bias").defined());
  return true;
}

// Padding "same" is symmetric only when dilation·(k−1) is even (as the torch::nn view).
bool same_padding(const LayerSpec& s, std::vector<int64_t>& padding, std::string* why) {
  padding.clear();
  for (size_t i = 0; i < s.kernel.size(); ++i) {
    const int64_t total = s.dilation[i] * (s.kernel[i] - 1);
    if (total % 2) {
      if (why) *why = "padding 'same' with an even kernel (asymmetric padding)";
      return false;
    }
    padding.push_back(total / 2);
  }
  return true;
}

template <size_t D>
bool conv_spec(const Module& m, LayerSpec& out, std::string* why) {
  const auto W = tensor_attr(m, "weight");
  if (!W.defined() || W.dim() != static_cast<int64_t>(D) + 2) {
    if (why) *why = "convolution without a " + std::to_string(D + 2) + "-D weight";
    return false;
  }
  std::optional<std::vector<int64_t>> stride, dilation, padding;
  std::optional<c10::IValue> pad, groups;
  if (constant(m, "stride")) {  // scripted
    stride = ints(constant(m, "stride"), D);
    dilation = ints(constant(m, "dilation"), D);
    pad = constant(m, "padding");
    groups = constant(m, "groups");
  } else if (const Node* op = weight_op(m, {"aten::_convolution", "aten::_convolution_mode", "aten::conv1d",
                                            "aten::conv2d", "aten::conv3d"})) {  // traced
    if (op->kind() == c10::Symbol::fromQualString("aten::_convolution")) {
      const auto transposed = value_of(op->input(6));
      if (!transposed || !transposed->isBool() || transposed->toBool()) {
        if (why) *why = "a transposed convolution";
        return false;
      }
    }
    stride = ints(value_of(op->input(3)), D);
    pad = value_of(op->input(4));
    dilation = ints(value_of(op->input(5)), D);
    groups = value_of(op->input(op->kind() == c10::Symbol::fromQualString("aten::_convolution") ? 8 : 6));
    // padding_mode other than zeros: the traced code pads the input first and convolves without padding
    const Node* before = op->input(0)->node();
    if (before->kind() == c10::Symbol::fromQualString("aten::pad") && pad && ints(pad, D) &&
        *ints(pad, D) == std::vector<int64_t>(D, 0)) {
      const auto amounts = ints(value_of(before->input(1)), 2 * D);
      if (!amounts) {
        if (why) *why = "padding that is not a constant";
        return false;
      }
      std::vector<int64_t> p(D);
      for (size_t i = 0; i < D; ++i) {  // pairs (begin, end), last dimension first
        const int64_t b = (*amounts)[2 * (D - 1 - i)], e = (*amounts)[2 * (D - 1 - i) + 1];
        if (b != e) {
          if (why) *why = "asymmetric padding";
          return false;
        }
        p[i] = b;
      }
      pad = c10::IValue(c10::List<int64_t>(p));
    }
  } else {
    if (why) *why = kUntraced;
    return false;
  }
  if (!stride || !dilation || !groups || !groups->isInt() || !pad) {
    if (why) *why = "stride, padding, dilation or groups that are not constants";
    return false;
  }
  const int64_t g = groups->toInt();
  std::vector<int64_t> kernel(W.sizes().begin() + 2, W.sizes().end());
  out = LayerSpec::conv(W.size(1) * g, W.size(0), kernel, *stride, std::vector<int64_t>(D, 0), *dilation, g,
                        tensor_attr(m, "bias").defined());
  if (pad->isString()) {
    if (pad->toStringRef() == "same") return same_padding(out, out.padding, why);
    if (pad->toStringRef() == "valid") return true;
    if (why) *why = "padding '" + pad->toStringRef() + "'";
    return false;
  }
  padding = ints(pad, D);
  if (!padding) {
    if (why) *why = "padding that is not a constant";
    return false;
  }
  out.padding = *padding;
  return true;
}

bool layer_norm_spec(const Module& m, LayerSpec& out, std::string* why) {
  const auto W = tensor_attr(m, "weight");
  std::optional<c10::IValue> shape, eps;
  if (constant(m, "eps")) {
    shape = constant(m, "normalized_shape");
    eps = constant(m, "eps");
  } else if (const Node* op = weight_op(m, {"aten::layer_norm"})) {
    shape = value_of(op->input(1));
    eps = value_of(op->input(4));
  } else if (W.defined()) {
    if (why) *why = kUntraced;
    return false;
  }
  // the same words as the torch::nn view
  const auto dims = ints(shape, 1);
  if (!W.defined() || W.dim() != 1 || !dims) {
    if (why) *why = "LayerNorm without elementwise affine weights over exactly one axis";
    return false;
  }
  if (!eps || !eps->isDouble()) {
    if (why) *why = "eps that is not a constant";
    return false;
  }
  out = LayerSpec::layer_norm(W.size(0), eps->toDouble(), tensor_attr(m, "bias").defined());
  return true;
}

bool group_norm_spec(const Module& m, LayerSpec& out, std::string* why) {
  const auto W = tensor_attr(m, "weight");
  if (!W.defined() || W.dim() != 1) {
    if (why) *why = "GroupNorm without affine weights";
    return false;
  }
  std::optional<c10::IValue> groups, eps;
  if (constant(m, "eps")) {
    groups = constant(m, "num_groups");
    eps = constant(m, "eps");
  } else if (const Node* op = weight_op(m, {"aten::group_norm"})) {
    groups = value_of(op->input(1));
    eps = value_of(op->input(4));
  } else {
    if (why) *why = kUntraced;
    return false;
  }
  if (!groups || !groups->isInt() || !eps || !eps->isDouble()) {
    if (why) *why = "num_groups or eps that are not constants";
    return false;
  }
  out = LayerSpec::group_norm(groups->toInt(), W.size(0), eps->toDouble(), tensor_attr(m, "bias").defined());
  return true;
}

// The torch.nn layer classes a network adapts, by class name; `type` is the class name presets use (the
// torch::nn one: MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear in Python, a Linear in C++).
struct JitLayerType {
  const char* class_name;
  const char* type;
  bool (*spec)(const Module&, LayerSpec&, std::string*);
};

const JitLayerType kLayerTypes[] = {
    {"torch.nn.modules.linear.Linear", "Linear", linear_spec},
    {"torch.nn.modules.linear.NonDynamicallyQuantizableLinear", "Linear", linear_spec},
    {"torch.nn.modules.conv.Conv1d", "Conv1d", conv_spec<1>},
    {"torch.nn.modules.conv.Conv2d", "Conv2d", conv_spec<2>},
    {"torch.nn.modules.conv.Conv3d", "Conv3d", conv_spec<3>},
    {"torch.nn.modules.normalization.LayerNorm", "LayerNorm", layer_norm_spec},
    {"torch.nn.modules.normalization.GroupNorm", "GroupNorm", group_norm_spec},
};

const JitLayerType* layer_type(const std::string& cls) {
  for (const auto& t : kLayerTypes)
    if (cls == t.class_name) return &t;
  return nullptr;
}

// ---- the view: the TorchScript code reads `self.weight` / `self.bias` from the module's slots on every
// call, so binding writes those slots; the tensors they held are what restore() puts back

class JitLayer final : public HostLayer {
 public:
  JitLayer(Module m, std::string type, std::string path, LayerSpec spec, std::shared_ptr<const Probe> probe)
      : HostLayer(std::move(spec)), m_(std::move(m)), type_(std::move(type)), path_(std::move(path)),
        probe_(std::move(probe)) {}

  std::string type_name() const override { return type_; }
  const void* identity() const override { return m_._ivalue().get(); }
  torch::Tensor weight() const override { return tensor_attr(m_, "weight"); }
  torch::Tensor bias() const override { return tensor_attr(m_, "bias"); }
  void bind(const torch::Tensor& W, const torch::Tensor& b) override {
    if (b.defined() && !bias().defined()) set_bias(b);
    m_._ivalue()->setAttr("weight", W);
    if (b.defined()) m_._ivalue()->setAttr("bias", b);
  }
  void restore(const torch::Tensor& W0, const torch::Tensor& b0) override {
    m_._ivalue()->setAttr("weight", W0);
    if (b0.defined() || bias().defined()) m_._ivalue()->setAttr("bias", b0.defined() ? c10::IValue(b0) : c10::IValue());
  }
  std::string bias_refusal() const override {
    const auto slot = m_.type()->findAttributeSlot("bias");
    if (slot && c10::TensorType::get()->isSubtypeOf(*m_.type()->getAttribute(*slot)) &&
        probe_->reads(join(path_, "bias")))
      return "";
    return "TorchScript layer '" + path_ + "' (" + type_ +
           ") has no bias its code reads: an adapter that changes the bias (Full, Norm) cannot be applied to it";
  }
  bool add_bias(const torch::Tensor& bias, bool) override {
    set_bias(bias);
    return m_.type()->is_parameter(m_.type()->getAttributeSlot("bias"));
  }

 private:
  // A layer without bias gets one only where its code reads `self.bias` and the slot's type takes a
  // tensor (a custom layer declaring `bias: Optional[Tensor]`). A scripted torch.nn layer built without
  // bias has a None-typed slot (its compiled code may treat it as a constant); a traced one never reads it.
  void set_bias(const torch::Tensor& b) {
    if (auto why = bias_refusal(); !why.empty()) throw Error(why);
    m_._ivalue()->setSlot(*m_.type()->findAttributeSlot("bias"), b);
  }

  Module m_;
  std::string type_, path_;
  std::shared_ptr<const Probe> probe_;
};

class JitModule final : public HostModule {
 public:
  JitModule(Module m, std::string path, std::shared_ptr<const Probe> probe)
      : m_(std::move(m)), path_(std::move(path)), probe_(std::move(probe)) {}

  std::string type_name() const override {
    const auto cls = class_name(m_);
    const auto* t = layer_type(cls);
    return t ? t->type : last_atom(cls);
  }
  const void* identity() const override { return m_._ivalue().get(); }
  std::vector<std::pair<std::string, HostModulePtr>> children() const override {
    std::vector<std::pair<std::string, HostModulePtr>> out;
    for (const auto& c : m_.named_children())
      out.emplace_back(c.name, std::make_shared<JitModule>(c.value, join(path_, c.name), probe_));
    return out;
  }
  HostLayerPtr layer(std::string* why) const override {
    const auto* t = layer_type(class_name(m_));
    LayerSpec spec;
    if (!t || !t->spec(m_, spec, why)) return nullptr;
    if (!probe_->reads(join(path_, "weight"))) {
      if (why)
        *why = "the TorchScript code never reads " + join(path_, "weight") +
               " (the module is not used by forward or any other method: not called while tracing, or dead "
               "code), so an adapter there would change nothing";
      return nullptr;
    }
    return std::make_shared<JitLayer>(m_, t->type, path_, std::move(spec), probe_);
  }

 private:
  Module m_;
  std::string path_;
  std::shared_ptr<const Probe> probe_;
};

}  // namespace
}  // namespace jit_view

HostModulePtr host_module(const torch::jit::Module& module) {
  using namespace jit_view;
  // torch.jit.freeze turns the parameters into constants of the code and drops every attribute no method
  // reads, "training" included, which every module scripted or traced from torch.nn has
  // (docs/training.md#torchscript-frozen)
  if (!module.hasattr("training") && module.parameters().size() == 0)
    throw Error("TorchScript module " + class_name(module) +
                " is frozen (torch.jit.freeze or torch.jit.optimize_for_inference inlined its weights into the "
                "code as constants), so no layer of it can be adapted. Apply the adapter before freezing (load the "
                "module saved before torch.jit.freeze), or merge the adapter into the unfrozen .pt "
                "(`lycoris merge model.pt ADAPTER -o merged.pt`) and freeze the merged module");
  return std::make_shared<JitModule>(module, "", std::make_shared<const Probe>(module));
}

}  // namespace lycoris
