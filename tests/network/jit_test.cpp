// TorchScript modules as host models (lycoris/jit.hpp): the scripted and traced fixtures of
// tests/data/torchscript (made by make_fixtures.py; no Python here) against the same architecture in
// torch::nn: same layers, same files, same training; every algorithm applied and restored; files applied,
// switched, stacked and merged; the errors for frozen modules, unread layers and bad archives.
#include <gtest/gtest.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>
#include <fstream>
#include <thread>

#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/jit.hpp"
#include "lycoris/network.hpp"
#include "lycoris/tools/merge.hpp"
#include "test_util.hpp"

namespace jit_test {

using lycoris::test::all_close;
using lycoris::test::data_path;

// ---------------------------------------------------------------- Net of make_fixtures.py in torch::nn

struct CrossAttentionImpl : torch::nn::Module {
  int64_t heads;
  double scale;
  torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, to_out{nullptr};
  CrossAttentionImpl(int64_t dim, int64_t h) : heads(h), scale(std::pow(static_cast<double>(dim / h), -0.5)) {
    to_q = register_module("to_q", torch::nn::Linear(torch::nn::LinearOptions(dim, dim).bias(false)));
    to_k = register_module("to_k", torch::nn::Linear(torch::nn::LinearOptions(dim, dim).bias(false)));
    to_v = register_module("to_v", torch::nn::Linear(torch::nn::LinearOptions(dim, dim).bias(false)));
    to_out = register_module("to_out", torch::nn::Linear(dim, dim));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t b = x.size(0), n = x.size(1), c = x.size(2);
    auto split = [&](const torch::Tensor& t) { return t.reshape({b, n, heads, c / heads}).transpose(1, 2); };
    const auto q = split(to_q(x)), k = split(to_k(x)), v = split(to_v(x));
    const auto a = torch::softmax(torch::matmul(q, k.transpose(2, 3)) * scale, -1);
    return to_out(torch::matmul(a, v).transpose(1, 2).reshape({b, n, c}));
  }
};
TORCH_MODULE(CrossAttention);

struct BlockImpl : torch::nn::Module {
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  CrossAttention attn{nullptr};
  torch::nn::Sequential ff{nullptr};
  BlockImpl(int64_t dim, int64_t heads) {
    norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    attn = register_module("attn", CrossAttention(dim, heads));
    norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(1e-6)));
    ff = register_module("ff", torch::nn::Sequential(torch::nn::Linear(dim, 2 * dim), torch::nn::GELU(),
                                                     torch::nn::Linear(2 * dim, dim)));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = x + attn(norm1(x));
    return x + ff->forward(norm2(x));
  }
};
TORCH_MODULE(Block);

struct NetImpl : torch::nn::Module {
  torch::nn::Conv2d conv_in{nullptr}, down{nullptr};
  torch::nn::GroupNorm norm{nullptr};
  torch::nn::Conv1d seq{nullptr};
  Block block{nullptr};
  torch::nn::Linear head{nullptr};
  NetImpl() {
    conv_in = register_module("conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 16, 3).padding(1)));
    norm = register_module("norm", torch::nn::GroupNorm(4, 16));
    down = register_module("down", torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 16, 3).stride(2).padding(1)));
    seq = register_module("seq", torch::nn::Conv1d(torch::nn::Conv1dOptions(16, 16, 3).padding(1)));
    block = register_module("block", Block(16, 2));
    head = register_module("head", torch::nn::Linear(16, 10));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const auto h = torch::silu(norm(conv_in(x)));
    auto t = down(h).flatten(2);
    t = (t + seq(t)).transpose(1, 2);
    return head(block(t).mean(1));
  }
};
TORCH_MODULE(Net);

// ---------------------------------------------------------------- helpers

torch::jit::Module fixture(const std::string& name) {
  return lycoris::torchscript::load(data_path("torchscript/" + name + ".pt"));
}

torch::Tensor reference(const std::string& name) { return fixture("reference").attr(name).toTensor(); }

// The torch::nn Net holding the fixture's weights.
Net nn_copy(const torch::jit::Module& m) {
  Net net;
  torch::NoGradGuard g;
  auto params = net->named_parameters();
  size_t n = 0;
  for (const auto& p : m.named_parameters()) {
    params[p.name].copy_(p.value);
    ++n;
  }
  EXPECT_EQ(n, params.size());
  return net;
}

torch::Tensor run(torch::jit::Module& m, const torch::Tensor& x) { return m.forward({x}).toTensor(); }

std::map<std::string, torch::Tensor> parameter_objects(const torch::jit::Module& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : m.named_parameters()) out[p.name] = p.value;
  return out;
}

std::map<std::string, torch::Tensor> parameter_values(const torch::jit::Module& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : m.named_parameters()) out[p.name] = p.value.detach().clone();
  return out;
}

// Every parameter slot holds the very tensor it held before (restore() is bit-exact by identity).
void expect_same_objects(const torch::jit::Module& m, const std::map<std::string, torch::Tensor>& before) {
  for (const auto& p : m.named_parameters())
    EXPECT_TRUE(p.value.is_same(before.at(p.name))) << p.name << " is not the original tensor";
}

void perturb(lycoris::LycorisNetworkImpl& net, double scale = 0.05) {
  torch::NoGradGuard g;
  for (auto& p : net.parameters()) p.add_(torch::randn_like(p) * scale);
}

// The same adapter parameters (and buffers) in `to` as in `from`.
void copy_state(lycoris::LycorisNetworkImpl& from, lycoris::LycorisNetworkImpl& to) {
  torch::NoGradGuard g;
  auto src = from.named_parameters();
  for (auto& p : to.named_parameters()) p.value().copy_(src[p.key()]);
  auto srcb = from.named_buffers();
  for (auto& b : to.named_buffers()) b.value().copy_(srcb[b.key()]);
}

struct LayerRow {
  std::string path, type;
  bool layer;
  std::string spec;
  bool operator==(const LayerRow& o) const {
    return path == o.path && type == o.type && layer == o.layer && spec == o.spec;
  }
};

std::string spec_text(const lycoris::LayerSpec& s) {
  std::ostringstream os;
  auto list = [&](const std::vector<int64_t>& v) {
    for (auto i : v) os << i << ",";
    os << ";";
  };
  os << lycoris::to_string(s.kind) << " " << s.in_features << "→" << s.out_features << " k";
  list(s.kernel);
  os << " s";
  list(s.stride);
  os << " p";
  list(s.padding);
  os << " d";
  list(s.dilation);
  os << " g" << s.groups << " eps" << s.eps << " bias" << s.has_bias;
  return os.str();
}

std::vector<LayerRow> rows(const lycoris::HostModulePtr& root) {
  std::vector<LayerRow> out;
  for (const auto& [path, node] : lycoris::preorder(root)) {
    const auto layer = node->layer();
    out.push_back({path, node->type_name(), layer != nullptr, layer ? spec_text(layer->spec()) : ""});
  }
  return out;
}

void PrintTo(const LayerRow& r, std::ostream* os) { *os << r.path << " " << r.type << " " << r.spec; }

const char* const kForms[] = {"net_scripted", "net_traced"};

// ---------------------------------------------------------------- the host view

TEST(JitHost, ScriptedAndTracedModelsShowTheLayersOfTheTorchNnModel) {
  for (const char* form : kForms) {
    SCOPED_TRACE(form);
    auto m = fixture(form);
    const auto expected = rows(lycoris::host_module(nn_copy(m).ptr()));
    EXPECT_EQ(rows(lycoris::host_module(m)), expected);
    ASSERT_EQ(expected.size(), 18u);
    EXPECT_EQ(expected[0].type, "Net");
    EXPECT_EQ(expected[7].type, "CrossAttention");
  }
}

TEST(JitHost, TheFixtureComputesWhatPyTorchComputed) {
  const auto x = reference("input"), y = reference("output");
  for (const char* form : kForms) {
    auto m = fixture(form);
    EXPECT_TRUE(all_close(run(m, x), y, 1e-6, 1e-5, form));
    EXPECT_TRUE(all_close(nn_copy(m)->forward(x), y, 1e-6, 1e-5, std::string(form) + " in torch::nn"));
  }
}

TEST(JitHost, SettingsComeFromConstantsOrTheTracedOpAndUnsupportedOnesHaveReasons) {
  for (const char* form : {"settings_scripted", "settings_traced"}) {
    SCOPED_TRACE(form);
    auto m = fixture(form);
    std::map<std::string, lycoris::HostModulePtr> nodes;
    for (const auto& [path, node] : lycoris::preorder(lycoris::host_module(m))) nodes[path] = node;
    auto spec = [&](const std::string& path) {
      std::string why;
      const auto layer = nodes.at(path)->layer(&why);
      EXPECT_TRUE(layer) << path << ": " << why;
      return layer ? layer->spec() : lycoris::LayerSpec();
    };
    auto reason = [&](const std::string& path) {
      std::string why;
      EXPECT_FALSE(nodes.at(path)->layer(&why)) << path;
      return why;
    };
    const auto conv3d = spec("conv3d");
    EXPECT_EQ(conv3d.kind, lycoris::LayerKind::Conv3d);
    EXPECT_EQ(conv3d.kernel, (std::vector<int64_t>{1, 3, 3}));
    EXPECT_EQ(conv3d.stride, (std::vector<int64_t>{1, 2, 2}));
    EXPECT_EQ(conv3d.padding, (std::vector<int64_t>{0, 1, 1}));
    const auto dilated = spec("dilated");
    EXPECT_EQ(dilated.dilation, (std::vector<int64_t>{2}));
    EXPECT_EQ(dilated.padding, (std::vector<int64_t>{2}));  // 'same': dilation·(k−1)/2
    EXPECT_EQ(spec("reflect").padding, (std::vector<int64_t>{1, 1}));
    EXPECT_EQ(spec("grouped").groups, 2);
    EXPECT_EQ(spec("grouped").in_features, 4);
    EXPECT_FALSE(spec("fc_nobias").has_bias);
    EXPECT_EQ(spec("direct").out_features, 5);  // its weight is read by the parent's code, not its own forward
    EXPECT_NE(reason("even_same").find("asymmetric"), std::string::npos);
    EXPECT_NE(reason("ln2").find("exactly one axis"), std::string::npos);
    EXPECT_NE(reason("ln_plain").find("exactly one axis"), std::string::npos);
    EXPECT_NE(reason("gn_plain").find("without affine"), std::string::npos);
    EXPECT_NE(reason("unused").find("never reads unused.weight"), std::string::npos) << reason("unused");
  }
}

// ---------------------------------------------------------------- networks on TorchScript modules

const std::vector<std::string> kAlgorithms = {"lora",   "loha",  "lokr",  "full",     "ia3",
                                              "dylora", "glora", "glokr", "diag-oft", "boft"};

lycoris::NetworkOptions options(const std::string& algo) {
  auto module = lycoris::AdapterOptions().algo(algo);
  if (algo == "lokr" || algo == "glokr") module.factor(4);
  if (algo == "dylora") module.block_size(2);
  auto opts = lycoris::NetworkOptions().conv_dim(2).conv_alpha(1.0).train_norm(true).module(module);
  if (algo == "boft") {  // no butterfly layout for the 10 outputs of the head
    lycoris::Preset preset;
    preset.exclude_name = {"head"};
    opts.preset(preset);
  }
  return opts;
}

TEST(JitNetwork, TheSameModelGivesTheSameModulesAndTheSameFile) {
  const auto dir = lycoris::test::temp_dir("jit-same-file");
  for (const char* form : kForms) {
    SCOPED_TRACE(form);
    auto m = fixture(form);
    auto nn = nn_copy(m);
    torch::manual_seed(5);
    auto a = lycoris::create_lycoris(nn, 1.0, 4, 2.0, options("lokr"));
    torch::manual_seed(5);
    auto b = lycoris::create_lycoris(m, 1.0, 4, 2.0, options("lokr"));
    ASSERT_EQ(a->modules().size(), b->modules().size());
    ASSERT_EQ(a->modules().size(), 13u);
    for (size_t i = 0; i < a->modules().size(); ++i) {
      EXPECT_EQ(a->modules()[i].name, b->modules()[i].name);
      EXPECT_EQ(a->modules()[i].algo, b->modules()[i].algo);
      EXPECT_EQ(spec_text(a->modules()[i].layer), spec_text(b->modules()[i].layer));
    }
    EXPECT_TRUE(b->warnings().empty()) << b->warnings().front();
    a->save_weights(dir + "/nn.safetensors");
    b->save_weights(dir + "/jit.safetensors");
    EXPECT_EQ(lycoris::test::slurp(dir + "/nn.safetensors"), lycoris::test::slurp(dir + "/jit.safetensors"));

    // presets by class name: the attention block of the scripted model is the C++ CrossAttention
    lycoris::Preset attn = lycoris::Preset::builtin("attn-only");
    auto c = lycoris::create_lycoris(m, 1.0, 4, 1.0, lycoris::NetworkOptions().preset(attn));
    ASSERT_EQ(c->modules().size(), 4u);
    EXPECT_EQ(c->modules()[0].name, "lycoris_block_attn_to_q");
    EXPECT_EQ(c->modules()[3].name, "lycoris_block_attn_to_out");
  }
}

// Training the scripted (and the traced) model is training the torch::nn model: same adapter after N AdamW steps.
TEST(JitNetwork, TrainingEqualsTrainingTheTorchNnModel) {
  // one intra-op thread for both models whatever earlier tests set: reductions split differently across
  // threads round differently (1e-6 here), which is not what this test compares
  struct OneThread {
    int previous = torch::get_num_threads();
    OneThread() { torch::set_num_threads(1); }
    ~OneThread() { torch::set_num_threads(previous); }
  } one_thread;
  // op-by-op execution under ordinary autograd, as the library recommends for training
  // (docs/training.md#torchscript-speed): the same operations as the torch::nn model
  lycoris::torchscript::TrainingScope training;
  const auto x = reference("input");
  const auto target = torch::randn({2, 10}, torch::TensorOptions().dtype(torch::kFloat));
  for (const char* form : kForms)
    for (const std::string& algo : kAlgorithms) {
      SCOPED_TRACE(std::string(form) + " " + algo);
      auto m = fixture(form);
      auto nn = nn_copy(m);
      const auto before = parameter_objects(m);
      auto opts = options(algo);
      if (algo == "lora") opts.module().rank_dropout(0.2).module_dropout(0.1);
      torch::manual_seed(11);
      auto a = lycoris::create_lycoris(nn, 1.0, 4, 2.0, opts);
      torch::manual_seed(11);
      auto b = lycoris::create_lycoris(m, 1.0, 4, 2.0, opts);
      copy_state(*a, *b);  // DyLoRA's block draw at creation consumed the same numbers, but be explicit
      auto train = [&](lycoris::LycorisNetworkImpl& net, const std::function<torch::Tensor()>& forward, uint64_t seed) {
        torch::manual_seed(seed);
        torch::optim::AdamW opt(net.parameters(), torch::optim::AdamWOptions(1e-2));
        net.apply_to();
        for (int step = 0; step < 4; ++step) {
          torch::mse_loss(forward(), target).backward();
          opt.step();
          opt.zero_grad();
          net.on_step();
        }
      };
      train(*a, [&] { return nn->forward(x); }, 3);
      train(*b, [&] { return run(m, x); }, 3);
      const auto pa = a->named_parameters(), pb = b->named_parameters();
      ASSERT_EQ(pa.size(), pb.size());
      double moved = 0;
      for (const auto& p : pa) {
        EXPECT_TRUE(all_close(pb[p.key()], p.value(), 1e-6, 0, p.key()));
        moved += p.value().abs().sum().item<double>();
      }
      EXPECT_GT(moved, 0);
      b->eval();
      b->refresh();
      a->eval();
      a->refresh();
      EXPECT_TRUE(all_close(run(m, x), nn->forward(x), 1e-5, 1e-5, "trained outputs"));
      b->restore();
      expect_same_objects(m, before);
    }
}

TEST(JitNetwork, TrainingScopeTurnsTheExecutorsOptimizationsOffOnItsThreadAndRestoresThem) {
  ASSERT_TRUE(torch::jit::getGraphExecutorOptimize());
  {
    lycoris::torchscript::TrainingScope training;
    EXPECT_FALSE(torch::jit::getGraphExecutorOptimize());
    {
      lycoris::torchscript::TrainingScope nested;
      EXPECT_FALSE(torch::jit::getGraphExecutorOptimize());
    }
    EXPECT_FALSE(torch::jit::getGraphExecutorOptimize());
    bool other_thread = false;
    std::thread([&] { other_thread = torch::jit::getGraphExecutorOptimize(); }).join();
    EXPECT_TRUE(other_thread);
  }
  EXPECT_TRUE(torch::jit::getGraphExecutorOptimize());
}

TEST(JitNetwork, EveryAlgorithmAppliesAsOnTheTorchNnModelAndRestoresBitExactly) {
  const auto x = reference("input"), y0 = reference("output");
  auto m = fixture("net_scripted");
  auto nn = nn_copy(m);
  const auto before = parameter_objects(m);
  const auto values = parameter_values(m);
  for (const std::string& algo : kAlgorithms) {
    SCOPED_TRACE(algo);
    const auto opts = options(algo);
    torch::manual_seed(21);
    auto a = lycoris::create_lycoris(nn, 1.0, 4, 2.0, opts);
    auto b = lycoris::create_lycoris(m, 1.0, 4, 2.0, opts);
    copy_state(*a, *b);
    torch::manual_seed(22);
    perturb(*a);
    copy_state(*a, *b);
    a->eval();
    b->eval();
    a->apply_to();
    b->apply_to();
    const auto y = run(m, x);
    EXPECT_FALSE(torch::allclose(y, y0, 1e-5, 1e-5)) << "the adapter changed nothing";
    EXPECT_TRUE(all_close(y, nn->forward(x), 1e-5, 1e-5, algo));
    b->restore();
    a->restore();
    expect_same_objects(m, before);
    for (const auto& p : m.named_parameters()) {
      EXPECT_TRUE(torch::equal(p.value, values.at(p.name))) << p.name;
      EXPECT_TRUE(p.value.requires_grad()) << p.name;
    }
    EXPECT_TRUE(torch::equal(run(m, x), run(m, x)));
    EXPECT_TRUE(all_close(run(m, x), y0, 1e-6, 1e-5, "restored"));
  }
}

// Two adapter files for Net, made on the torch::nn model.
struct Files {
  std::string dir, lora, lokr;
};

const Files& files() {
  static const Files f = [] {
    Files out{lycoris::test::temp_dir("jit-files"), "", ""};
    out.lora = out.dir + "/lora.safetensors";
    out.lokr = out.dir + "/lokr.safetensors";
    auto nn = nn_copy(fixture("net_scripted"));
    torch::manual_seed(31);
    auto a = lycoris::create_lycoris(nn, 1.0, 4, 2.0, options("lora"));
    perturb(*a);
    a->save_weights(out.lora);
    auto b = lycoris::create_lycoris(nn, 1.0, 2, 1.0, options("lokr"));
    perturb(*b);
    b->save_weights(out.lokr);
    return out;
  }();
  return f;
}

TEST(JitNetwork, FilesApplySwitchStackAndMergeAsOnTheTorchNnModel) {
  const auto x = reference("input"), y0 = reference("output");
  for (const char* form : kForms) {
    SCOPED_TRACE(form);
    auto m = fixture(form);
    auto nn = nn_copy(m);
    const auto before = parameter_objects(m);
    auto expect_same = [&](const std::string& what) {
      EXPECT_TRUE(all_close(run(m, x), nn->forward(x), 1e-5, 1e-5, what));
    };

    auto j1 = lycoris::create_lycoris_from_weights(m, files().lora, 0.8);
    auto n1 = lycoris::create_lycoris_from_weights(nn, files().lora, 0.8);
    EXPECT_TRUE(j1->warnings().empty());
    ASSERT_EQ(j1->modules().size(), n1->modules().size());
    j1->apply_to();
    n1->apply_to();
    expect_same("lora at 0.8");
    j1->set_multiplier(0.5);
    n1->set_multiplier(0.5);
    expect_same("lora at 0.5");

    // switch: one restore, one apply
    auto j2 = lycoris::create_lycoris_from_weights(m, files().lokr, 1.0);
    auto n2 = lycoris::create_lycoris_from_weights(nn, files().lokr, 1.0);
    j1->restore();
    n1->restore();
    expect_same_objects(m, before);
    EXPECT_TRUE(all_close(run(m, x), y0, 1e-6, 1e-5, "restored"));
    j2->apply_to();
    n2->apply_to();
    expect_same("lokr");

    // stacking
    j1->apply_to();
    n1->apply_to();
    expect_same("lora + lokr");
    j2->restore();
    n2->restore();
    expect_same("lora after lokr came off");
    j1->restore();
    n1->restore();
    expect_same_objects(m, before);

    // merge_to writes into the module's own parameters
    j1->merge_to(0.8);
    n1->merge_to(0.8);
    expect_same("merged lora");
    expect_same_objects(m, before);
    for (const auto& p : m.named_parameters())
      EXPECT_TRUE(all_close(p.value, nn->named_parameters()[p.name], 1e-6, 1e-6, p.name));
  }
}

// Golden: an adapter applied to the TorchScript model is `lycoris merge` on its state dict.
TEST(JitNetwork, AppliedFileEqualsTheMergedStateDict) {
  const auto dir = lycoris::test::temp_dir("jit-golden");
  auto m = fixture("net_traced");
  std::vector<std::pair<std::string, torch::Tensor>> state;
  for (const auto& p : m.named_parameters()) state.emplace_back(p.name, p.value.detach());
  lycoris::io::save_file(dir + "/base.safetensors", state);
  lycoris::tools::MergeOptions o;
  o.adapters = {{files().lora, 0.7}, {files().lokr, 1.0}};
  lycoris::tools::merge(dir + "/base.safetensors", dir + "/merged.safetensors", o);
  const auto merged = lycoris::io::SafetensorsFile::open(dir + "/merged.safetensors");

  for (const auto& [file, w] : o.adapters) lycoris::create_lycoris_from_weights(m, file, w)->merge_to(w);
  for (const auto& p : m.named_parameters())
    EXPECT_TRUE(all_close(p.value, merged.tensor(p.name), 1e-6, 1e-6, p.name));
}

// ---------------------------------------------------------------- errors

TEST(JitErrors, AFrozenModuleNamesTheProblemAndBothFixes) {
  auto m = fixture("net_frozen");
  for (int i = 0; i < 2; ++i) {
    try {
      if (i == 0)
        lycoris::create_lycoris(m);
      else
        lycoris::create_lycoris_from_weights(m, files().lora);
      ADD_FAILURE() << "no error";
    } catch (const lycoris::Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("is frozen"), std::string::npos) << what;
      EXPECT_NE(what.find("before freezing"), std::string::npos) << what;
      EXPECT_NE(what.find("lycoris merge"), std::string::npos) << what;
    }
  }
}

TEST(JitErrors, ALayerTheCodeNeverReadsIsSkippedWhenTrainingAndAnErrorWhenAFileTargetsIt) {
  const auto dir = lycoris::test::temp_dir("jit-unread");
  for (const char* form : {"settings_scripted", "settings_traced"}) {
    SCOPED_TRACE(form);
    auto m = fixture(form);
    auto net = lycoris::create_lycoris(m, 1.0, 2, 1.0, lycoris::NetworkOptions().preset([] {
      lycoris::Preset p;
      p.exclude_name = {"grouped"};  // grouped convs are refused (docs/training.md#supported-layers)
      return p;
    }()));
    EXPECT_EQ(net->find("lycoris_unused"), nullptr);
    EXPECT_NE(net->find("lycoris_direct"), nullptr);
    bool warned = false;
    for (const auto& w : net->warnings()) warned |= w.find("never reads unused.weight") != std::string::npos;
    EXPECT_TRUE(warned);

    const auto file = dir + "/unused.safetensors";
    lycoris::io::save_file(file, {{"lycoris_unused.lora_down.weight", torch::randn({2, 3})},
                                  {"lycoris_unused.lora_up.weight", torch::randn({3, 2})},
                                  {"lycoris_unused.alpha", torch::tensor(1.0)}});
    try {
      lycoris::create_lycoris_from_weights(m, file);
      ADD_FAILURE() << "no error";
    } catch (const lycoris::Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("lycoris_unused targets 'unused'"), std::string::npos) << what;
      EXPECT_NE(what.find("never reads unused.weight"), std::string::npos) << what;
    }
    // check against the archive predicts that failure: the tensor fits, the layer cannot be adapted
    const auto r = lycoris::test::run_cli({"check", file, "--base", data_path(std::string("torchscript/") + form + ".pt")});
    EXPECT_EQ(r.code, 1) << r.out << r.err;
    EXPECT_NE(r.out.find("unadaptable"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("never reads unused.weight"), std::string::npos) << r.out;
  }
}

// A bias change (Full's diff_b) on a torch.nn layer built without bias: the scripted layer's `bias` slot is
// typed None (its code may treat it as a constant), the traced layer's code never reads it. Applying or
// merging is an error naming the layer, and the model computes what it computed before.
TEST(JitErrors, ABiasChangeOnALayerWithoutBiasIsAnErrorNamingTheLayer) {
  const auto dir = lycoris::test::temp_dir("jit-bias");
  const auto x = reference("input");
  for (const char* form : {"net_scripted", "net_traced"}) {
    SCOPED_TRACE(form);
    auto m = fixture(form);
    auto to_q = m.attr("block").toModule().attr("attn").toModule().attr("to_q").toModule();
    const auto W0 = to_q.attr("weight").toTensor();
    const auto no_bias = [&] { return !to_q.hasattr("bias") || to_q.attr("bias").isNone(); };
    ASSERT_TRUE(no_bias());
    const auto file = dir + "/" + form + ".safetensors";
    lycoris::io::save_file(file, {{"lycoris_block_attn_to_q.diff", torch::full_like(W0, 0.1)},
                                  {"lycoris_block_attn_to_q.diff_b", torch::ones({W0.size(0)})}});
    const auto before = run(m, x);
    auto net = lycoris::create_lycoris_from_weights(m, file);
    for (const bool merge : {false, true}) {
      try {
        merge ? net->merge_to(1.0) : net->apply_to();
        ADD_FAILURE() << "no error";
      } catch (const lycoris::Error& e) {
        EXPECT_NE(std::string(e.what()).find("'block.attn.to_q'"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("no bias its code reads"), std::string::npos) << e.what();
      }
      EXPECT_TRUE(no_bias());
      EXPECT_TRUE(torch::equal(to_q.attr("weight").toTensor(), W0));
      EXPECT_TRUE(torch::equal(run(m, x), before));
    }
  }
}

TEST(JitErrors, AFileMatchingNothingAndBadArchivesAreErrorsNamingTheFile) {
  const auto dir = lycoris::test::temp_dir("jit-bad");
  auto m = fixture("settings_scripted");
  EXPECT_THROW(lycoris::create_lycoris_from_weights(m, files().lora), lycoris::KeyError);

  EXPECT_THROW(lycoris::torchscript::load(dir + "/missing.pt"), lycoris::IOError);
  {
    std::ofstream(dir + "/text.pt") << "not an archive";
  }
  try {
    lycoris::torchscript::load(dir + "/text.pt");
    ADD_FAILURE();
  } catch (const lycoris::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/text.pt: not a TorchScript archive"), std::string::npos) << e.what();
  }
  const auto bytes = lycoris::test::slurp(data_path("torchscript/net_scripted.pt"));
  {
    std::ofstream(dir + "/truncated.pt", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  try {
    lycoris::torchscript::load(dir + "/truncated.pt");
    ADD_FAILURE();
  } catch (const lycoris::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("truncated.pt: cannot read the TorchScript archive"), std::string::npos)
        << e.what();
  }
}

// ---------------------------------------------------------------- the CLI on .pt archives

TEST(JitCli, MergeWritesAnArchiveThatComputesTheAppliedAdapter) {
  const auto dir = lycoris::test::temp_dir("jit-cli-merge");
  const auto x = reference("input");
  for (const char* form : kForms) {
    SCOPED_TRACE(form);
    const auto out = dir + "/" + form + "-merged.pt";
    const auto r = lycoris::test::run_cli({"merge", data_path(std::string("torchscript/") + form + ".pt"), files().lora,
                                           files().lokr, "-o", out, "-w", "0.8", "-w", "0.5"});
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_NE(r.out.find("merged 2 adapter(s)"), std::string::npos) << r.out;
    auto merged = torch::jit::load(out);

    auto m = fixture(form);
    auto a = lycoris::create_lycoris_from_weights(m, files().lora, 0.8);
    a->merge_to(0.8);
    auto b = lycoris::create_lycoris_from_weights(m, files().lokr, 0.5);
    b->merge_to(0.5);
    EXPECT_TRUE(all_close(run(merged, x), run(m, x), 1e-6, 1e-6, "merged archive"));
    // the archive's code and other attributes came along
    EXPECT_EQ(merged.get_method("forward").graph()->toString(), m.get_method("forward").graph()->toString());
    if (std::string(form) == "net_scripted")
      EXPECT_EQ(merged.attr("block").toModule().attr("attn").toModule().attr("heads").toInt(), 2);
  }
}

TEST(JitCli, MergeFailuresLeaveNoOutput) {
  const auto dir = lycoris::test::temp_dir("jit-cli-fail");
  const auto bytes = lycoris::test::slurp(data_path("torchscript/net_scripted.pt"));
  {
    std::ofstream(dir + "/truncated.pt", std::ios::binary) << bytes.substr(0, bytes.size() - 100);
  }
  auto r = lycoris::test::run_cli({"merge", dir + "/truncated.pt", files().lora, "-o", dir + "/out.pt"});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("truncated.pt"), std::string::npos) << r.err;
  r = lycoris::test::run_cli({"merge", data_path("torchscript/net_frozen.pt"), files().lora, "-o", dir + "/out.pt"});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("frozen"), std::string::npos) << r.err;
  r = lycoris::test::run_cli(
      {"merge", data_path("torchscript/settings_scripted.pt"), files().lora, "-o", dir + "/out.pt"});
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(lycoris::test::listing(dir), std::vector<std::string>{"truncated.pt"});
}

TEST(JitCli, InfoAndCheckReadArchives) {
  const auto pt = data_path("torchscript/net_traced.pt");
  auto r = lycoris::test::run_cli({"info", pt});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("TorchScript"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("block.attn.to_q"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("Conv2d(3, 16, k=3x3"), std::string::npos) << r.out;
  r = lycoris::test::run_cli({"info", data_path("torchscript/settings_scripted.pt"), "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("never reads unused.weight"), std::string::npos) << r.out;

  r = lycoris::test::run_cli({"check", files().lora, "--base", pt});
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("clean"), std::string::npos) << r.out;
  r = lycoris::test::run_cli({"check", files().lora, "--base", data_path("torchscript/settings_traced.pt")});
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  EXPECT_NE(r.out.find("unmatched"), std::string::npos) << r.out;
}

}  // namespace jit_test
