// Network layer: create_lycoris on unmodified torch models (rebuild mode), drop-in bypass layers, restore,
// merge, stacking, multiplier, stale-weight detection, save → create_lycoris_from_weights, and every golden
// case loaded through create_lycoris_from_weights on a model built to match the case.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/network.hpp"
#include "lycoris/nn/layers.hpp"
#include "test_util.hpp"

namespace network_test {

using lycoris::test::all_close;
using nlohmann::json;

// ---------------------------------------------------------------- a small model, generic in its layer types

template <typename Linear, typename Conv2d>
struct SmallImpl : torch::nn::Module {
  Conv2d conv3{nullptr}, conv1{nullptr};
  torch::nn::GroupNorm gn{nullptr};
  Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::LayerNorm ln{nullptr};
  std::shared_ptr<torch::nn::Module> head;

  SmallImpl() {
    conv3 = register_module("conv3", Conv2d(torch::nn::Conv2dOptions(4, 8, 3).padding(1)));
    gn = register_module("gn", torch::nn::GroupNorm(2, 8));
    conv1 = register_module("conv1", Conv2d(torch::nn::Conv2dOptions(8, 8, 1)));
    // a nested custom parent: head.fc1, head.ln, head.fc2
    head = register_module("head", std::make_shared<torch::nn::Module>());
    fc1 = head->register_module("fc1", Linear(8, 16));
    ln = head->register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({16})));
    fc2 = head->register_module("fc2", Linear(torch::nn::LinearOptions(16, 4).bias(false)));
    // non-trivial norm parameters
    torch::NoGradGuard g;
    for (auto& p : parameters()) p.add_(torch::randn_like(p) * 0.1);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::silu(gn(conv3(x)));
    h = conv1(h).mean({2, 3});
    return fc2(torch::gelu(ln(fc1(h))));
  }
};

using Plain = SmallImpl<torch::nn::Linear, torch::nn::Conv2d>;
using DropIn = SmallImpl<lycoris::nn::Linear, lycoris::nn::Conv2d>;

torch::Tensor input() {
  torch::manual_seed(123);
  return torch::randn({3, 4, 5, 5});
}

std::map<std::string, torch::Tensor> snapshot(torch::nn::Module& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : m.named_parameters()) out[p.key()] = p.value().detach().clone();
  return out;
}

void expect_params_equal(torch::nn::Module& m, const std::map<std::string, torch::Tensor>& snap) {
  for (const auto& p : m.named_parameters())
    EXPECT_TRUE(torch::equal(p.value(), snap.at(p.key()))) << p.key() << " changed";
}

void load_snapshot(torch::nn::Module& m, const std::map<std::string, torch::Tensor>& snap) {
  torch::NoGradGuard g;
  for (auto& p : m.named_parameters()) p.value().copy_(snap.at(p.key()));
}

// Adapter parameters moved away from their ΔW = 0 initialisation, so every check sees a real ΔW.
void perturb(lycoris::LycorisNetworkImpl& net, double scale = 0.05) {
  torch::NoGradGuard g;
  for (auto& p : net.parameters()) p.add_(torch::randn_like(p) * scale);
}

struct Variant {
  std::string label;
  lycoris::AdapterOptions module;
  int64_t dim = 4;
};

std::vector<Variant> variants() {
  using O = lycoris::AdapterOptions;
  return {
      {"lora", O().algo("lora")},
      {"lora_tucker", O().algo("lora").tucker(true)},
      {"lora_dora", O().algo("lora").dora(true)},
      {"lora_rs_scalar", O().algo("lora").rs_lora(true).use_scalar(true)},
      {"loha", O().algo("loha")},
      {"loha_dora", O().algo("loha").dora(true)},
      {"lokr", O().algo("lokr").factor(4)},
      {"lokr_dora_in", O().algo("lokr").factor(2).dora(true).wd_on_out(false)},
      {"full", O().algo("full")},
      {"ia3", O().algo("ia3")},
      {"ia3_input", O().algo("ia3").train_on_input(true)},
      {"dylora", O().algo("dylora").block_size(2)},
      {"glora", O().algo("glora")},
      {"glokr", O().algo("glokr").factor(2)},
      {"diag_oft", O().algo("diag-oft")},
      {"diag_oft_constraint", O().algo("diag-oft").constraint(0.01).rescaled(true)},
      {"boft", O().algo("boft")},
  };
}

lycoris::LycorisNetwork make_net(std::shared_ptr<torch::nn::Module> model, const Variant& v, bool bypass = false,
                                 double m = 1.0) {
  auto module = v.module;
  module.bypass_mode(bypass);
  return lycoris::create_lycoris(std::move(model), m, v.dim, 2.0,
                                 lycoris::NetworkOptions().conv_dim(2).conv_alpha(1.0).train_norm(true).module(module));
}

void PrintTo(const Variant& v, std::ostream* os) { *os << v.label; }

class NetworkAlgo : public ::testing::TestWithParam<Variant> {};

TEST_P(NetworkAlgo, RebuildRestoreMergeBypassSaveLoad) {
  const auto& v = GetParam();
  torch::manual_seed(1);
  auto model = std::make_shared<Plain>();
  const auto x = input();
  const auto base = snapshot(*model);
  std::map<std::string, torch::Tensor> base_objects;  // the registered parameter objects themselves
  for (const auto& p : model->named_parameters()) base_objects[p.key()] = p.value();
  const auto y0 = model->forward(x).detach();

  torch::manual_seed(2);
  auto net = make_net(model, v);
  // every layer is adapted: 2 convs, 2 linears, 2 norms
  ASSERT_EQ(net->modules().size(), 6u);
  EXPECT_EQ(net->modules()[0].name, "lycoris_conv3");
  EXPECT_EQ(net->modules()[0].algo, lycoris::find_algorithm(v.module.algo()).name);
  EXPECT_EQ(net->find("lycoris_gn")->algo, "norm");
  EXPECT_EQ(net->find("lycoris_head_fc2")->path, "head.fc2");
  perturb(*net);
  net->eval();

  // --- rebuild: gradients reach only adapter parameters; base parameters stay bit-identical
  net->apply_to();
  {
    net->train();
    net->refresh();
    auto y = model->forward(x);
    y.square().sum().backward();
    for (const auto& p : model->named_parameters())
      EXPECT_FALSE(p.value().grad().defined() && p.value().grad().abs().sum().item<double>() > 0)
          << p.key() << " received a gradient";
    double total = 0;
    for (const auto& p : net->parameters())
      if (p.grad().defined()) total += p.grad().abs().sum().item<double>();
    EXPECT_GT(total, 0.0) << "no gradient reached the adapters";
    net->eval();
    net->refresh();
  }
  const auto y_hooked = model->forward(x).detach();
  EXPECT_FALSE(torch::allclose(y_hooked, y0)) << "the adapter changed nothing";
  expect_params_equal(*model, base);

  // --- restore: bit-identical outputs and tensors (the same parameter objects in the members)
  net->restore();
  EXPECT_TRUE(torch::equal(model->forward(x), y0));
  expect_params_equal(*model, base);
  EXPECT_TRUE(model->conv3->weight.is_same(base_objects.at("conv3.weight")));
  EXPECT_TRUE(model->fc1->bias.is_same(base_objects.at("head.fc1.bias")));
  EXPECT_TRUE(model->ln->weight.is_same(base_objects.at("head.ln.weight")));
  for (const auto& p : model->named_parameters()) EXPECT_TRUE(p.value().requires_grad()) << p.key();

  // --- multiplier change between steps
  net->apply_to();
  net->set_multiplier(0.5);
  const auto y_half = model->forward(x).detach();
  net->restore();

  // --- merge_to(m) output == hooked output at m
  net->merge_to(0.5);
  EXPECT_TRUE(all_close(model->forward(x), y_half, 2e-5, 1e-4, v.label + " merged vs hooked at 0.5"));
  load_snapshot(*model, base);
  net->set_multiplier(1.0);

  // --- bypass: drop-in layers with the same weights and adapter parameters == rebuild
  torch::manual_seed(1);
  auto dropin = std::make_shared<DropIn>();
  load_snapshot(*dropin, base);
  if (v.module.algo() == "full") {  // Full trains the weight itself: no bypass (docs/training.md#algo-full)
    EXPECT_THROW(make_net(dropin, v, /*bypass=*/true), lycoris::OptionError);
  } else {
    auto bnet = make_net(dropin, v, /*bypass=*/true);
    {
      torch::NoGradGuard g;
      auto src = net->named_parameters();
      for (auto& p : bnet->named_parameters()) p.value().copy_(src[p.key()]);
      auto srcb = net->named_buffers();
      for (auto& b : bnet->named_buffers()) b.value().copy_(srcb[b.key()]);
    }
    bnet->eval();
    bnet->apply_to();
    EXPECT_TRUE(all_close(dropin->forward(x), y_hooked, 2e-5, 1e-4, v.label + " bypass vs rebuild"));
    // the drop-in convs/linears run bypass (weights untouched), the norms fall back to rebuild (a warning)
    EXPECT_TRUE(dropin->conv3->weight.is_same(dropin->named_parameters()["conv3.weight"]));
    EXPECT_TRUE(dropin->fc1->weight.is_same(dropin->named_parameters()["head.fc1.weight"]));
    EXPECT_EQ(bnet->warnings().size(), 2u);
    bnet->restore();
    EXPECT_TRUE(torch::equal(dropin->forward(x), y0));
  }

  // --- save → create_lycoris_from_weights reproduces the outputs
  const auto dir = lycoris::test::temp_dir("network-" + v.label);
  net->save_weights(dir + "/a.safetensors");
  auto file = lycoris::io::SafetensorsFile::open(dir + "/a.safetensors");
  EXPECT_EQ(file.metadata().at("lycoris_algo"), v.module.algo());
  EXPECT_TRUE(file.metadata().count("lycoris_version"));
  const auto expected_keys = net->state_tensors();
  ASSERT_EQ(file.names().size(), expected_keys.size());
  for (size_t i = 0; i < expected_keys.size(); ++i) EXPECT_EQ(file.names()[i], expected_keys[i].first);
  auto loaded = lycoris::create_lycoris_from_weights(model, dir + "/a.safetensors");
  EXPECT_TRUE(loaded->warnings().empty());
  ASSERT_EQ(loaded->modules().size(), net->modules().size());
  loaded->eval();
  loaded->apply_to();
  EXPECT_TRUE(all_close(model->forward(x), y_hooked, 2e-5, 1e-4, v.label + " reloaded"));
  loaded->restore();
  expect_params_equal(*model, base);
}

INSTANTIATE_TEST_SUITE_P(Algorithms, NetworkAlgo, ::testing::ValuesIn(variants()),
                         [](const ::testing::TestParamInfo<Variant>& i) { return i.param.label; });

// ---------------------------------------------------------------- stacking

TEST(NetworkStack, TwoNetworksStackAdditivelyAndComeOffInAnyOrder) {
  torch::manual_seed(3);
  auto model = std::make_shared<Plain>();
  const auto x = input();
  const auto base = snapshot(*model);
  const auto y0 = model->forward(x).detach();
  torch::NoGradGuard no_grad;
  auto n1 = lycoris::create_lycoris(model, 1.0, 4, 2.0, lycoris::NetworkOptions().module(lycoris::AdapterOptions().algo("lora")));
  auto n2 = lycoris::create_lycoris(model, 0.7, 2, 1.0, lycoris::NetworkOptions().module(lycoris::AdapterOptions().algo("loha")));
  perturb(*n1);
  perturb(*n2);
  auto W0 = model->fc1->weight;
  auto d1 = n1->find("lycoris_head_fc1")->adapter->apply_weight(W0, 1.0) - W0;
  auto d2 = n2->find("lycoris_head_fc1")->adapter->apply_weight(W0, 0.7) - W0;

  n1->apply_to();
  const auto y1 = model->forward(x);
  n2->apply_to();
  EXPECT_TRUE(all_close(model->fc1->weight, W0 + d1 + d2, 1e-6, 1e-5, "stacked weight"));
  const auto y12 = model->forward(x);
  n1->restore();  // first in, first out
  EXPECT_TRUE(all_close(model->fc1->weight, W0 + d2, 1e-6, 1e-5, "n2 left"));
  n2->restore();
  EXPECT_TRUE(torch::equal(model->forward(x), y0));
  expect_params_equal(*model, base);

  n2->apply_to();
  n1->apply_to();
  EXPECT_TRUE(all_close(model->forward(x), y12, 1e-5, 1e-4, "order independent"));
  n2->restore();  // last in, first out... of the other one
  EXPECT_TRUE(all_close(model->forward(x), y1, 1e-5, 1e-4, "n1 left"));
  n1->restore();
  EXPECT_TRUE(torch::equal(model->forward(x), y0));
  EXPECT_TRUE(model->fc1->weight.is_same(model->named_parameters()["head.fc1.weight"]));
}

// Bypass networks stack on drop-in layers like rebuild networks on torch layers: y = org(x) + Σ δ_i(x).
TEST(NetworkStack, BypassStackEqualsRebuildStack) {
  torch::manual_seed(8);
  auto plain = std::make_shared<Plain>();
  auto dropin = std::make_shared<DropIn>();
  load_snapshot(*dropin, snapshot(*plain));
  const auto x = input();
  torch::NoGradGuard no_grad;
  auto mk = [](std::shared_ptr<torch::nn::Module> m, const std::string& algo, bool bypass, double mult) {
    return lycoris::create_lycoris(std::move(m), mult, 4, 2.0,
                                   lycoris::NetworkOptions().module(lycoris::AdapterOptions().algo(algo).bypass_mode(bypass)));
  };
  auto r1 = mk(plain, "lora", false, 1.0), r2 = mk(plain, "loha", false, 0.6);
  auto b1 = mk(dropin, "lora", true, 1.0), b2 = mk(dropin, "loha", true, 0.6);
  perturb(*r1);
  perturb(*r2);
  for (auto [src, dst] : {std::pair{r1, b1}, std::pair{r2, b2}}) {
    auto sp = src->named_parameters();
    for (auto& p : dst->named_parameters()) p.value().copy_(sp[p.key()]);
  }
  r1->apply_to();
  r2->apply_to();
  b1->apply_to();
  b2->apply_to();
  EXPECT_TRUE(b1->warnings().empty());
  EXPECT_TRUE(all_close(dropin->forward(x), plain->forward(x), 1e-5, 1e-4, "bypass stack vs rebuild stack"));
  b1->restore();
  r1->restore();
  EXPECT_TRUE(all_close(dropin->forward(x), plain->forward(x), 1e-5, 1e-4, "one left"));
  b2->set_multiplier(-0.3);
  r2->set_multiplier(-0.3);
  EXPECT_TRUE(all_close(dropin->forward(x), plain->forward(x), 1e-5, 1e-4, "multiplier read at every forward"));
  b2->restore();
  r2->restore();
  EXPECT_TRUE(torch::equal(dropin->forward(x), plain->forward(x)));
}

// Drop-in Conv1d/Conv3d (stride, padding, dilation) in bypass == torch layers in rebuild.
TEST(NetworkBypass, Conv1dConv3dDropIns) {
  torch::manual_seed(9);
  auto build = [](bool dropin) {
    auto m = std::make_shared<torch::nn::Module>();
    auto o1 = torch::nn::Conv1dOptions(3, 6, 3).stride(2).padding(2).dilation(2);
    auto o3 = torch::nn::Conv3dOptions(3, 4, 3).padding(1);
    if (dropin) {
      m->register_module("c1", lycoris::nn::Conv1d(o1));
      m->register_module("c3", lycoris::nn::Conv3d(o3));
    } else {
      m->register_module("c1", torch::nn::Conv1d(o1));
      m->register_module("c3", torch::nn::Conv3d(o3));
    }
    return m;
  };
  auto a = build(false), b = build(true);
  load_snapshot(*b, snapshot(*a));
  torch::NoGradGuard no_grad;
  auto ra = lycoris::create_lycoris(a, 1.0, 2, 1.0, lycoris::NetworkOptions().module(lycoris::AdapterOptions().algo("lora")));
  auto rb = lycoris::create_lycoris(b, 1.0, 2, 1.0,
                                    lycoris::NetworkOptions().module(lycoris::AdapterOptions().algo("lora").bypass_mode(true)));
  perturb(*ra, 0.2);
  auto sp = ra->named_parameters();
  for (auto& p : rb->named_parameters()) p.value().copy_(sp[p.key()]);
  ra->apply_to();
  rb->apply_to();
  const auto x1 = torch::randn({2, 3, 9}), x3 = torch::randn({2, 3, 4, 4, 4});
  auto fwd1 = [&](torch::nn::Module& m, const torch::Tensor& x) {
    auto c = m.named_children()["c1"];
    if (auto* d = dynamic_cast<lycoris::nn::Conv1dImpl*>(c.get())) return d->forward(x);
    return dynamic_cast<torch::nn::Conv1dImpl*>(c.get())->forward(x);
  };
  auto fwd3 = [&](torch::nn::Module& m, const torch::Tensor& x) {
    auto c = m.named_children()["c3"];
    if (auto* d = dynamic_cast<lycoris::nn::Conv3dImpl*>(c.get())) return d->forward(x);
    return dynamic_cast<torch::nn::Conv3dImpl*>(c.get())->forward(x);
  };
  EXPECT_TRUE(all_close(fwd1(*b, x1), fwd1(*a, x1), 1e-5, 1e-4, "Conv1d"));
  EXPECT_TRUE(all_close(fwd3(*b, x3), fwd3(*a, x3), 1e-5, 1e-4, "Conv3d"));
  EXPECT_TRUE(rb->warnings().empty());
}

// Two networks with different presets on one model: each keeps its own targets.
TEST(NetworkStack, DifferentPresetsCoexist) {
  torch::manual_seed(4);
  auto model = std::make_shared<Plain>();
  auto lin = lycoris::Preset::builtin("full");
  lin.target_module = {"Linear"};
  auto convs = lycoris::Preset::builtin("full");
  convs.target_module = {"Conv2d"};
  convs.lora_prefix = "lora_unet";
  auto a = lycoris::create_lycoris(model, 1.0, 4, 1.0, lycoris::NetworkOptions().preset(lin));
  auto b = lycoris::create_lycoris(model, 1.0, 4, 1.0, lycoris::NetworkOptions().preset(convs));
  ASSERT_EQ(a->modules().size(), 2u);
  ASSERT_EQ(b->modules().size(), 2u);
  EXPECT_EQ(a->modules()[0].name, "lycoris_head_fc1");
  EXPECT_EQ(b->modules()[0].name, "lora_unet_conv3");
  // a third, default network still sees every Linear/Conv layer
  auto c = lycoris::create_lycoris(model, 1.0, 4, 1.0);
  EXPECT_EQ(c->modules().size(), 4u);
}

// ---------------------------------------------------------------- training loop discipline

TEST(NetworkTraining, ForgettingTheRefreshIsLoudAndOnStepTrains) {
  torch::manual_seed(5);
  auto model = std::make_shared<Plain>();
  const auto x = input();
  const auto target = torch::randn({3, 4});
  auto net = lycoris::create_lycoris(model, 1.0, 4, 4.0, lycoris::NetworkOptions().module(lycoris::AdapterOptions().algo("lokr")));
  net->apply_to();
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(1e-2));
  auto loss_of = [&] { return torch::mse_loss(model->forward(x), target); };
  auto l = loss_of();
  l.backward();
  opt.step();
  opt.zero_grad();
  // no on_step(): the next backward must fail with a clear message
  try {
    loss_of().backward();
    ADD_FAILURE() << "backward through stale weights succeeded";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("on_step"), std::string::npos) << e.what();
  }
  opt.zero_grad();
  net->on_step();
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    auto loss = loss_of();
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
    loss.backward();
    opt.step();
    opt.zero_grad();
    net->on_step();
  }
  EXPECT_LT(last, first);
}

TEST(NetworkOptions, UnknownAlgorithmAndBadOptionsAreOptionErrors) {
  auto model = std::make_shared<Plain>();
  EXPECT_THROW(lycoris::create_lycoris(model, 1.0, 4, 1.0,
                                       lycoris::NetworkOptions().module(lycoris::AdapterOptions().algo("lorax"))),
               lycoris::OptionError);
  EXPECT_THROW(lycoris::create_lycoris(model, 1.0, -1, 1.0), lycoris::OptionError);
  // DyLoRA rank not a multiple of block_size: the error names the module
  try {
    lycoris::create_lycoris(model, 1.0, 3, 1.0,
                            lycoris::NetworkOptions().module(lycoris::AdapterOptions().algo("dylora").block_size(2)));
    ADD_FAILURE() << "accepted";
  } catch (const lycoris::OptionError& e) {
    EXPECT_NE(std::string(e.what()).find("lycoris_"), std::string::npos) << e.what();
  }
}

// docs/format.md (module names, LoRA, Norm, key order): names, key order, shapes and alpha of a saved LoCon + Norm network; dtype cast.
TEST(NetworkSave, KeysShapesAndDtypeFollowTheFormat) {
  torch::manual_seed(7);
  auto model = std::make_shared<Plain>();
  auto net = lycoris::create_lycoris(model, 1.0, 4, 2.0, lycoris::NetworkOptions().conv_dim(2).conv_alpha(1.0).train_norm(true));
  const auto dir = lycoris::test::temp_dir("network-format");
  net->save_weights(dir + "/a.safetensors", torch::kHalf, {{"note", "x"}, {"lycoris_algo", "overridden"}});
  auto f = lycoris::io::SafetensorsFile::open(dir + "/a.safetensors");
  using Shape = std::vector<int64_t>;
  const std::vector<std::pair<std::string, Shape>> expected = {
      {"lycoris_conv3.alpha", {}},          {"lycoris_conv3.lora_up.weight", {8, 2, 1, 1}},
      {"lycoris_conv3.lora_down.weight", {2, 4, 3, 3}},
      {"lycoris_gn.w_norm", {8}},           {"lycoris_gn.b_norm", {8}},
      {"lycoris_conv1.alpha", {}},          {"lycoris_conv1.lora_up.weight", {8, 4, 1, 1}},
      {"lycoris_conv1.lora_down.weight", {4, 8, 1, 1}},
      {"lycoris_head_fc1.alpha", {}},       {"lycoris_head_fc1.lora_up.weight", {16, 4}},
      {"lycoris_head_fc1.lora_down.weight", {4, 8}},
      {"lycoris_head_ln.w_norm", {16}},     {"lycoris_head_ln.b_norm", {16}},
      {"lycoris_head_fc2.alpha", {}},       {"lycoris_head_fc2.lora_up.weight", {4, 4}},
      {"lycoris_head_fc2.lora_down.weight", {4, 16}},
  };
  ASSERT_EQ(f.names().size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(f.names()[i], expected[i].first);
    EXPECT_EQ(f.info(expected[i].first).shape, expected[i].second) << expected[i].first;
    EXPECT_EQ(f.info(expected[i].first).dtype, lycoris::io::DType::F16) << expected[i].first;
  }
  EXPECT_EQ(f.tensor("lycoris_conv3.alpha").item<float>(), 1.0f);
  EXPECT_EQ(f.tensor("lycoris_head_fc1.alpha").item<float>(), 2.0f);
  EXPECT_TRUE(torch::equal(f.tensor("lycoris_head_fc1.lora_up.weight"), torch::zeros({16, 4}, torch::kHalf)));  // ΔW = 0 at init
  EXPECT_EQ(f.metadata().at("note"), "x");
  EXPECT_EQ(f.metadata().at("lycoris_algo"), "overridden");  // given entries win
  auto opts = nlohmann::json::parse(f.metadata().at("lycoris_options"));
  EXPECT_EQ(opts["linear_dim"], 4);
  EXPECT_EQ(opts["conv_dim"], 2);
  EXPECT_EQ(opts["preset"], "full");
}

// Options the reference's create_lycoris drops silently reach the modules here (docs/loaders.md#q37-ignored-arguments).
TEST(NetworkOptions, DroppedByTheReferenceReachTheModules) {
  auto model = std::make_shared<Plain>();
  auto net = lycoris::create_lycoris(
      model, 1.0, 4, 1.0,
      lycoris::NetworkOptions().module(
          lycoris::AdapterOptions().algo("lora").rs_lora(true).dora(true).rank_dropout(0.1).rank_dropout_scale(true)));
  for (const auto& m : net->modules()) {
    EXPECT_TRUE(m.adapter->options().rs_lora()) << m.name;
    EXPECT_TRUE(m.adapter->options().dora()) << m.name;
    EXPECT_TRUE(m.adapter->options().rank_dropout_scale()) << m.name;
    // rs-LoRA: the stored alpha is α·√r so that alpha/r = α/√r (docs/format.md#alpha)
    EXPECT_NEAR(m.adapter->alpha(), 1.0 * std::sqrt(double(m.adapter->rank())), 1e-9) << m.name;
  }
  // multiplier 0 leaves the model's outputs as they were (ΔW scaled by 0; DoRA's scale equals the norm)
  net->apply_to();
  net->eval();
  net->set_multiplier(0.0);
  const auto x = input();
  net->restore();
  const auto y0 = model->forward(x);
  net->apply_to();
  EXPECT_TRUE(all_close(model->forward(x), y0, 1e-5, 1e-5, "multiplier 0"));
  net->restore();
}

// ---------------------------------------------------------------- from weights: unmatched / wrong shapes

TEST(NetworkFromWeights, UnmatchedModulesWarnWrongShapesThrow) {
  torch::manual_seed(6);
  auto model = std::make_shared<Plain>();
  const auto dir = lycoris::test::temp_dir("network-fromw");
  lycoris::io::save_file(dir + "/a.safetensors",
                         {{"lycoris_head_fc1.lora_up.weight", torch::randn({16, 2})},
                          {"lycoris_head_fc1.lora_down.weight", torch::randn({2, 8})},
                          {"lycoris_head_fc9.lora_up.weight", torch::randn({16, 2})},
                          {"lycoris_head_fc9.lora_down.weight", torch::randn({2, 8})}});
  auto net = lycoris::create_lycoris_from_weights(model, dir + "/a.safetensors", 0.5);
  ASSERT_EQ(net->modules().size(), 1u);
  ASSERT_EQ(net->warnings().size(), 1u);
  EXPECT_NE(net->warnings()[0].find("lycoris_head_fc9"), std::string::npos);
  EXPECT_DOUBLE_EQ(net->multiplier(), 0.5);

  lycoris::io::save_file(dir + "/b.safetensors", {{"lycoris_head_fc1.lora_up.weight", torch::randn({16, 2})},
                                                  {"lycoris_head_fc1.lora_down.weight", torch::randn({2, 9})}});
  try {
    lycoris::create_lycoris_from_weights(model, dir + "/b.safetensors");
    ADD_FAILURE() << "accepted";
  } catch (const lycoris::ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("lycoris_head_fc1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("head.fc1"), std::string::npos) << e.what();
  }
}

TEST(NetworkFromWeights, ALayerAnswersToTheFirstOfItsNamesTheFileUses) {
  torch::manual_seed(7);
  auto model = std::make_shared<Plain>();
  const auto dir = lycoris::test::temp_dir("network-fromw-prefix");
  const auto file = dir + "/a.safetensors";
  lycoris::io::save_file(file, {{"lora_unet_head_fc1.lora_up.weight", torch::randn({16, 2})},
                                {"lora_unet_head_fc1.lora_down.weight", torch::randn({2, 8})},
                                {"lycoris_head_fc1.lora_up.weight", torch::randn({16, 2})},
                                {"lycoris_head_fc1.lora_down.weight", torch::randn({2, 8})}});
  // the preset's prefix first, then the known ones in order
  for (const std::string prefix : {"lycoris", "lora_unet"}) {
    SCOPED_TRACE(prefix);
    lycoris::Preset preset;
    preset.lora_prefix = prefix;
    auto net = lycoris::create_lycoris_from_weights(model, file, 1.0, preset);
    ASSERT_EQ(net->modules().size(), 1u);
    EXPECT_EQ(net->modules()[0].name, prefix + "_head_fc1");
    EXPECT_EQ(net->modules()[0].path, "head.fc1");
    ASSERT_EQ(net->warnings().size(), 1u);
    const std::string other = prefix == "lycoris" ? "lora_unet_head_fc1" : "lycoris_head_fc1";
    EXPECT_NE(net->warnings()[0].find(other + " matches no layer"), std::string::npos) << net->warnings()[0];
  }
}

// ---------------------------------------------------------------- golden cases through the network

const json& manifest() {
  static const json m = [] {
    std::ifstream in(lycoris::test::data_path("golden/manifest.json"));
    return json::parse(in);
  }();
  return m;
}

// The "mini" template model of the golden fixtures (tests/data/golden/manifest.json → templates.mini).
struct Mini {
  std::shared_ptr<torch::nn::Module> root = std::make_shared<torch::nn::Module>();
  torch::nn::GroupNorm norm1{nullptr};
  torch::nn::Conv2d conv1{nullptr}, skip{nullptr};
  torch::nn::LayerNorm bnorm1{nullptr}, bnorm2{nullptr};
  torch::nn::Linear q{nullptr}, k{nullptr}, v{nullptr}, out{nullptr}, ff0{nullptr}, ff2{nullptr};
  torch::nn::Conv1d temporal{nullptr};

  Mini(const json& dims, bool bias) {
    const int64_t c0 = dims["c0"], c1 = dims["c1"], f = dims["f"], cout = dims["cout"], groups = dims["groups"];
    auto node = [](const std::shared_ptr<torch::nn::Module>& parent, const std::string& name) {
      return parent->register_module(name, std::make_shared<torch::nn::Module>());
    };
    auto down0 = node(node(root, "down"), "0");
    norm1 = down0->register_module("norm1", torch::nn::GroupNorm(torch::nn::GroupNormOptions(groups, c0)));
    conv1 = down0->register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(c0, c1, 3).stride(2).padding(1).bias(bias)));
    skip = down0->register_module("skip", torch::nn::Conv2d(torch::nn::Conv2dOptions(c0, c1, 1).stride(2).bias(bias)));
    auto block = node(node(root, "blocks"), "0");
    bnorm1 = block->register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c1})));
    auto attn = node(block, "attn");
    q = attn->register_module("to_q", torch::nn::Linear(torch::nn::LinearOptions(c1, c1).bias(false)));
    k = attn->register_module("to_k", torch::nn::Linear(torch::nn::LinearOptions(c1, c1).bias(false)));
    v = attn->register_module("to_v", torch::nn::Linear(torch::nn::LinearOptions(c1, c1).bias(false)));
    out = node(attn, "to_out")->register_module("0", torch::nn::Linear(torch::nn::LinearOptions(c1, c1).bias(bias)));
    bnorm2 = block->register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c1})));
    auto net = node(node(block, "ff"), "net");
    ff0 = net->register_module("0", torch::nn::Linear(torch::nn::LinearOptions(c1, f).bias(bias)));
    ff2 = net->register_module("2", torch::nn::Linear(torch::nn::LinearOptions(f, c1).bias(bias)));
    temporal = node(root, "temporal")->register_module("conv", torch::nn::Conv1d(torch::nn::Conv1dOptions(c1, cout, 3).padding(1).bias(bias)));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto h = skip(x) + conv1(torch::silu(norm1(x)));
    auto t = h.flatten(2).transpose(1, 2);
    auto n = bnorm1(t);
    const double c1 = static_cast<double>(t.size(-1));
    auto att = torch::softmax(q(n).matmul(k(n).transpose(1, 2)) / std::sqrt(c1), -1);
    t = t + out(att.matmul(v(n)));
    t = t + ff2(torch::gelu(ff0(bnorm2(t))));
    return temporal(t.transpose(1, 2));
  }

  void load(const lycoris::io::SafetensorsFile& base) {
    torch::NoGradGuard g;
    auto params = root->named_parameters();
    ASSERT_EQ(params.size(), base.tensors().size());
    for (auto& p : params) p.value().copy_(base.tensor(p.key()));
  }
};

class NetworkGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(NetworkGolden, LoadsThroughCreateLycorisFromWeightsAndReproducesOutputs) {
  const json* c = nullptr;
  for (const auto& cc : manifest()["cases"])
    if (cc["name"] == GetParam()) c = &cc;
  ASSERT_TRUE(c);
  if ((*c)["status"] == "rejected") GTEST_SKIP() << "rejected case: nothing to load";
  ASSERT_EQ((*c)["model"]["template"], "mini");
  const std::string dir = lycoris::test::data_path("golden/" + GetParam() + "/");
  const double atol = (*c)["tolerance"]["outputs"]["atol"], rtol = (*c)["tolerance"]["outputs"]["rtol"];
  Mini mini((*c)["model"]["dims"], (*c)["model"]["bias"]);
  auto base = lycoris::io::SafetensorsFile::open(dir + "base.safetensors");
  mini.load(base);
  auto io = lycoris::io::SafetensorsFile::open(dir + "io.safetensors");

  auto net = lycoris::create_lycoris_from_weights(mini.root, dir + "adapter.safetensors");
  EXPECT_TRUE(net->warnings().empty());
  ASSERT_EQ(net->modules().size(), (*c)["modules"].size());
  net->eval();
  net->apply_to();
  torch::NoGradGuard no_grad;
  auto layers = lycoris::named_modules_preorder(mini.root);
  for (const auto& mod : (*c)["modules"]) {
    const std::string path = mod["module"];
    SCOPED_TRACE(GetParam() + ": " + path);
    const auto* nm = net->find(mod["lycoris_name"].get<std::string>());
    ASSERT_TRUE(nm);
    EXPECT_EQ(nm->path, path);
    if (!io.contains("x." + path)) continue;
    // the hooked torch layer's own forward
    auto& host = *nm->host;
    torch::Tensor y;
    const auto x = io.tensor("x." + path);
    if (auto* l = dynamic_cast<torch::nn::LinearImpl*>(&host)) y = l->forward(x);
    else if (auto* c2 = dynamic_cast<torch::nn::Conv2dImpl*>(&host)) y = c2->forward(x);
    else if (auto* c1 = dynamic_cast<torch::nn::Conv1dImpl*>(&host)) y = c1->forward(x);
    else if (auto* ln = dynamic_cast<torch::nn::LayerNormImpl*>(&host)) y = ln->forward(x);
    else if (auto* gn = dynamic_cast<torch::nn::GroupNormImpl*>(&host)) y = gn->forward(x);
    ASSERT_TRUE(y.defined());
    EXPECT_TRUE(all_close(y, io.tensor("y_rebuild." + path), atol, rtol, "y_rebuild"));
  }
  if (io.contains("x.__model__")) {
    EXPECT_TRUE(all_close(mini.forward(io.tensor("x.__model__")), io.tensor("y_rebuild.__model__"), atol, rtol,
                          "whole model"));
    net->restore();
    EXPECT_TRUE(all_close(mini.forward(io.tensor("x.__model__")), io.tensor("y_base.__model__"), atol, rtol, "restored"));
  }
}

std::vector<std::string> golden_cases() {
  std::vector<std::string> names;
  for (const auto& c : manifest()["cases"]) names.push_back(c["name"]);
  return names;
}

INSTANTIATE_TEST_SUITE_P(Cases, NetworkGolden, ::testing::ValuesIn(golden_cases()),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           std::string s = i.param;
                           for (auto& ch : s)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return s;
                         });

}  // namespace network_test
