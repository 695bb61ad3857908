// Host views: which torch::nn modules are adaptable layers (with which LayerSpec, or why not), binding
// through a view, and a network over a host model that is no torch::nn module at all.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>

#include "lycoris/host_layer.hpp"
#include "lycoris/network.hpp"
#include "lycoris/nn/layers.hpp"
#include "test_util.hpp"

namespace host_layer_test {

using lycoris::HostLayer;
using lycoris::HostLayerPtr;
using lycoris::HostModule;
using lycoris::HostModulePtr;
using lycoris::LayerKind;
using lycoris::LayerSpec;

TEST(HostLayerTorch, TheTableGivesSpecsAndReasons) {
  auto root = std::make_shared<torch::nn::Module>();
  root->register_module("fc", torch::nn::Linear(torch::nn::LinearOptions(4, 3).bias(false)));
  root->register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 6, 3).stride(2).padding(1).groups(2)));
  root->register_module("dropin", lycoris::nn::Conv1d(torch::nn::Conv1dOptions(2, 2, 3)));
  root->register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({5}).eps(1e-6)));
  root->register_module("ln2d", torch::nn::LayerNorm(torch::nn::LayerNormOptions({2, 5})));
  root->register_module("gn", torch::nn::GroupNorm(torch::nn::GroupNormOptions(2, 4).affine(false)));
  root->register_module("act", torch::nn::ReLU());
  std::map<std::string, HostModulePtr> nodes;
  for (const auto& [path, node] : lycoris::preorder(lycoris::host_module(root))) nodes[path] = node;
  ASSERT_EQ(nodes.size(), 8u);
  auto layer = [&](const std::string& path, std::string* why = nullptr) { return nodes.at(path)->layer(why); };

  EXPECT_EQ(nodes.at("fc")->type_name(), "Linear");
  const auto fc = layer("fc");
  ASSERT_TRUE(fc);
  EXPECT_EQ(fc->spec().kind, LayerKind::Linear);
  EXPECT_EQ(fc->spec().in_features, 4);
  EXPECT_EQ(fc->spec().out_features, 3);
  EXPECT_FALSE(fc->spec().has_bias);

  const auto conv = layer("conv");
  ASSERT_TRUE(conv);
  EXPECT_EQ(conv->spec().kind, LayerKind::Conv2d);
  EXPECT_EQ(conv->spec().kernel, (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(conv->spec().stride, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(conv->spec().padding, (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(conv->spec().groups, 2);
  EXPECT_EQ(conv->bypass(), nullptr);  // a plain torch layer's forward does not ask adapters

  EXPECT_EQ(nodes.at("dropin")->type_name(), "Conv1d");
  const auto dropin = layer("dropin");
  ASSERT_TRUE(dropin);
  EXPECT_EQ(dropin->spec().kind, LayerKind::Conv1d);
  EXPECT_NE(dropin->bypass(), nullptr);

  const auto ln = layer("ln");
  ASSERT_TRUE(ln);
  EXPECT_EQ(ln->spec().kind, LayerKind::LayerNorm);
  EXPECT_DOUBLE_EQ(ln->spec().eps, 1e-6);

  std::string why;
  EXPECT_FALSE(layer("ln2d", &why));
  EXPECT_NE(why.find("exactly one axis"), std::string::npos) << why;
  why.clear();
  EXPECT_FALSE(layer("gn", &why));
  EXPECT_NE(why.find("without affine"), std::string::npos) << why;
  why.clear();
  EXPECT_FALSE(layer("act", &why));
  EXPECT_TRUE(why.empty()) << why;  // not a kind of layer a network adapts: no reason to give
  EXPECT_FALSE(layer(""));
}

TEST(HostLayerTorch, BindingLeavesTheRegisteredParametersAlone) {
  torch::nn::Linear fc(4, 3);
  const auto view = lycoris::host_module(fc.ptr())->layer();
  ASSERT_TRUE(view);
  EXPECT_EQ(view->identity(), lycoris::host_module(fc.ptr())->layer()->identity());
  const auto W0 = fc->weight, b0 = fc->bias;
  const auto W = torch::zeros_like(W0), b = torch::ones_like(b0);
  view->bind(W, b);
  EXPECT_TRUE(view->weight().is_same(W));
  EXPECT_TRUE(fc->named_parameters()["weight"].is_same(W0));
  EXPECT_TRUE(torch::equal(fc->forward(torch::randn({2, 4})), torch::ones({2, 3})));
  view->restore(W0, b0);
  EXPECT_TRUE(fc->weight.is_same(W0));
  EXPECT_TRUE(fc->bias.is_same(b0));
}

// ---------------------------------------------------------------- a host model that is no torch::nn module

// A dense layer held in plain tensors; the "model" computes x·Wᵀ + b with whatever the slot holds.
struct Slot {
  torch::Tensor weight, bias;
  torch::Tensor forward(const torch::Tensor& x) const { return torch::addmm(bias, x, weight.t()); }
};

class DenseLayer : public HostLayer {
 public:
  explicit DenseLayer(std::shared_ptr<Slot> s)
      : HostLayer(LayerSpec::linear(s->weight.size(1), s->weight.size(0))), s_(std::move(s)) {}
  std::string type_name() const override { return "Dense"; }
  const void* identity() const override { return s_.get(); }
  torch::Tensor weight() const override { return s_->weight; }
  torch::Tensor bias() const override { return s_->bias; }
  void bind(const torch::Tensor& W, const torch::Tensor& b) override {
    s_->weight = W;
    s_->bias = b;
  }
  void restore(const torch::Tensor& W0, const torch::Tensor& b0) override { bind(W0, b0); }
  bool add_bias(const torch::Tensor& b, bool) override {
    s_->bias = b;
    return false;
  }

 private:
  std::shared_ptr<Slot> s_;
};

class Node : public HostModule {
 public:
  explicit Node(std::shared_ptr<Slot> slot = nullptr) : slot_(std::move(slot)) {}
  std::string type_name() const override { return slot_ ? "Dense" : "Block"; }
  const void* identity() const override { return this; }
  std::vector<std::pair<std::string, HostModulePtr>> children() const override { return children_; }
  HostLayerPtr layer(std::string*) const override { return slot_ ? std::make_shared<DenseLayer>(slot_) : nullptr; }
  std::vector<std::pair<std::string, HostModulePtr>> children_;

 private:
  std::shared_ptr<Slot> slot_;
};

TEST(HostLayerCustom, ANetworkTrainsRestoresAndMergesAHostThatIsNoTorchModule) {
  torch::manual_seed(3);
  auto a = std::make_shared<Slot>(Slot{torch::randn({6, 4}), torch::randn({6})});
  auto b = std::make_shared<Slot>(Slot{torch::randn({3, 6}), torch::randn({3})});
  auto root = std::make_shared<Node>(), block = std::make_shared<Node>();
  root->children_ = {{"block", block}};
  block->children_ = {{"a", std::make_shared<Node>(a)}, {"b", std::make_shared<Node>(b)}};
  auto forward = [&](const torch::Tensor& x) { return b->forward(torch::relu(a->forward(x))); };

  lycoris::Preset preset;
  preset.target_module = {"Dense"};
  lycoris::LycorisNetwork net(HostModulePtr(root), lycoris::NetworkOptions()
                                                       .linear_dim(2)
                                                       .preset(preset)
                                                       .module(lycoris::AdapterOptions().algo("lora").bypass_mode(true)));
  ASSERT_EQ(net->modules().size(), 2u);
  EXPECT_EQ(net->modules()[0].name, "lycoris_block_a");
  EXPECT_EQ(net->modules()[1].path, "block.b");
  EXPECT_FALSE(net->modules()[0].host);  // no torch::nn module behind it

  const auto Wa = a->weight, ba = a->bias, Wb = b->weight;
  torch::optim::SGD opt(net->parameters(), 0.1);
  net->apply_to();  // bypass mode needs a forward that asks the adapters: rebuild mode, with a warning
  ASSERT_EQ(net->warnings().size(), 2u);
  EXPECT_NE(net->warnings()[0].find("(Dense) uses rebuild mode"), std::string::npos) << net->warnings()[0];
  EXPECT_FALSE(a->weight.is_same(Wa));
  const auto x = torch::randn({5, 4});
  for (int step = 0; step < 3; ++step) {
    forward(x).square().mean().backward();
    opt.step();
    opt.zero_grad();
    net->on_step();
  }
  // after training ΔW ≠ 0: the bound weights are the adapters' W0 + ΔW
  const auto expected = net->modules()[1].adapter->apply_weight(Wb, 1.0).detach();
  EXPECT_FALSE(torch::allclose(expected, Wb));
  EXPECT_TRUE(torch::allclose(b->weight, expected));

  net->restore();
  EXPECT_TRUE(a->weight.is_same(Wa));
  EXPECT_TRUE(a->bias.is_same(ba));
  EXPECT_TRUE(b->weight.is_same(Wb));

  const auto merged = expected.clone();
  net->merge_to(1.0);
  EXPECT_TRUE(b->weight.is_same(Wb));  // merged in place
  EXPECT_TRUE(torch::allclose(Wb, merged));
}

}  // namespace host_layer_test
