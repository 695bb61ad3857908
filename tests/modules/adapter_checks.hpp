// Checks shared by the per-algorithm adapter tests (tests/modules/<algo>_test.cpp): host layers to test on,
// bypass == rebuild, autograd vs finite differences, file round trip, all of them at once for one set of
// options, and the golden cases of tests/data/golden (merged weights at m = 1 and 0.7, module outputs
// rebuild and bypass).
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace lycoris::test {

// Linear 6→8, Conv1d 4→8 k3 p1, Conv2d 4→8 3×3 stride 2 padding 1, Conv3d 2→4 k3 p1, Conv2d 4→8 3×2
// padding (2, 1) dilation 2 (all with bias).
inline std::vector<LayerSpec> host_layers() {
  return {LayerSpec::linear(6, 8), LayerSpec::conv(4, 8, {3}, {1}, {1}),
          LayerSpec::conv(4, 8, {3, 3}, {2, 2}, {1, 1}), LayerSpec::conv(2, 4, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}),
          LayerSpec::conv(4, 8, {3, 2}, {1, 1}, {2, 1}, {2, 2})};
}

// An input batch for the layer: Linear (2, 3, I); Conv (2, I, 5, …).
inline torch::Tensor input_for(const LayerSpec& l, torch::ScalarType dtype = torch::kFloat64) {
  if (l.is_norm()) return torch::randn({2, l.out_features, 3}, dtype);
  if (!l.is_conv()) return torch::randn({2, 3, l.in_features}, dtype);
  std::vector<int64_t> shape{2, l.in_features};
  shape.resize(2 + l.kernel.size(), 5);
  return torch::randn(shape, dtype);
}

// Sets every parameter of the adapter to random values (so that checks do not run at the identity).
inline void randomize(AdapterImpl& a, double scale = 0.3) {
  torch::NoGradGuard g;
  for (auto& p : a.parameters()) p.copy_(torch::randn_like(p) * scale);
}

// bypass_forward(x, W, b, m) == layer_forward(x, apply_weight(W, m), apply_bias(b, m)).
inline void expect_bypass_equals_rebuild(AdapterImpl& a, const LayerSpec& l, double m, const std::string& what) {
  auto W = torch::randn(l.weight_shape(), torch::kFloat64);
  auto b = l.has_bias ? torch::randn({l.out_features}, torch::kFloat64) : torch::Tensor();
  auto x = input_for(l);
  torch::NoGradGuard g;
  auto rebuild = layer_forward(x, l, a.apply_weight(W, m), a.apply_bias(b, m));
  auto bypass = a.bypass_forward(x, W, b, m);
  EXPECT_TRUE(all_close(bypass, rebuild, 1e-9, 1e-9, what + " bypass vs rebuild"));
  // unbatched input (no batch axis)
  auto x1 = x[0];
  EXPECT_TRUE(all_close(a.bypass_forward(x1, W, b, m), layer_forward(x1, l, a.apply_weight(W, m), a.apply_bias(b, m)),
                        1e-9, 1e-9, what + " unbatched bypass vs rebuild"));
}

// Gradient of sum(y ⊙ probe) w.r.t. every adapter parameter (rebuild and bypass paths) against central
// finite differences, in double precision.
inline void expect_gradients_match(AdapterImpl& a, const LayerSpec& l, double m, const std::string& what) {
  a.to(torch::kFloat64);
  auto W = torch::randn(l.weight_shape(), torch::kFloat64);
  auto b = l.has_bias ? torch::randn({l.out_features}, torch::kFloat64) : torch::Tensor();
  auto x = input_for(l);
  torch::Tensor probe;
  for (int bypass = 0; bypass < 2; ++bypass) {
    auto loss = [&]() {
      auto y = bypass ? a.bypass_forward(x, W, b, m) : layer_forward(x, l, a.apply_weight(W, m), a.apply_bias(b, m));
      if (!probe.defined()) probe = torch::randn_like(y);
      return (y * probe).sum();
    };
    auto params = a.named_parameters();
    for (auto& p : params) p.value().mutable_grad() = torch::Tensor();
    loss().backward();
    for (auto& p : params) {
      auto t = p.value();
      ASSERT_TRUE(t.grad().defined()) << what << ": no gradient for " << p.key();
      auto grad = t.grad().clone();
      auto numeric = torch::zeros_like(t);
      auto flat_t = t.data().view({-1});
      const double eps = 1e-6;
      torch::NoGradGuard g;
      for (int64_t i = 0; i < flat_t.numel(); ++i) {
        const double v = flat_t[i].item<double>();
        flat_t[i] = v + eps;
        const double up = loss().item<double>();
        flat_t[i] = v - eps;
        const double down = loss().item<double>();
        flat_t[i] = v;
        numeric.view({-1})[i] = (up - down) / (2 * eps);
      }
      EXPECT_TRUE(all_close(grad, numeric, 1e-6, 1e-5, what + (bypass ? " bypass" : " rebuild") + " d/d" + p.key()));
    }
  }
}

// file_tensors → TensorMap → load: the same tensors in the same order, and the same W'.
inline void expect_round_trip(AdapterImpl& a, const Algorithm& algo, const LayerSpec& l, const std::string& what) {
  auto saved = a.file_tensors();
  TensorMap map;
  for (auto& [k, v] : saved) map[k] = v;
  ASSERT_TRUE(algo.detect(map)) << what;
  auto loaded = algo.load("lycoris_test", map, l);
  auto again = loaded->file_tensors();
  ASSERT_EQ(again.size(), saved.size()) << what;
  for (size_t i = 0; i < saved.size(); ++i) {
    EXPECT_EQ(again[i].first, saved[i].first) << what;
    EXPECT_EQ(again[i].second.scalar_type(), saved[i].second.scalar_type()) << what << " " << saved[i].first;
    EXPECT_TRUE(torch::equal(again[i].second.to(torch::kCPU), saved[i].second.to(torch::kCPU)))
        << what << " " << saved[i].first;
  }
  a.eval();
  loaded->eval();
  auto W = torch::randn(l.weight_shape());
  torch::NoGradGuard g;
  EXPECT_TRUE(all_close(loaded->apply_weight(W, 0.8), a.apply_weight(W, 0.8), 1e-6, 1e-6, what + " reloaded W'"));
}

// fp16 / bf16 host weights: W' keeps W's dtype and is the fp32 computation rounded once.
inline void expect_low_precision_host(AdapterImpl& a, const LayerSpec& l, const std::string& what) {
  a.to(torch::kFloat32);
  a.eval();
  auto W = torch::randn(l.weight_shape());
  torch::NoGradGuard g;
  for (auto dt : {torch::kFloat16, torch::kBFloat16}) {
    auto Wl = W.to(dt);
    auto out = a.apply_weight(Wl, 0.7);
    EXPECT_EQ(out.scalar_type(), dt) << what;
    EXPECT_TRUE(torch::equal(out, a.apply_weight(Wl.to(torch::kFloat32), 0.7).to(dt))) << what;
  }
}

// module_dropout = 1: the adapter is skipped in training mode (W' = W, b' = b, bypass = host output) and
// applied in eval mode.
inline void expect_module_dropout(const Algorithm& algo, AdapterOptions options, const LayerSpec& l) {
  auto a = algo.create(l, options.module_dropout(1.0));
  randomize(*a);
  a->to(torch::kFloat64);
  auto W = torch::randn(l.weight_shape(), torch::kFloat64);
  auto b = torch::randn({l.out_features}, torch::kFloat64);
  auto x = input_for(l);
  torch::NoGradGuard g;
  a->train();
  EXPECT_TRUE(torch::equal(a->apply_weight(W, 1.0), W)) << algo.name;
  EXPECT_TRUE(torch::equal(a->apply_bias(b, 1.0), b)) << algo.name;
  EXPECT_TRUE(torch::equal(a->bypass_forward(x, W, b, 1.0), layer_forward(x, l, W, b))) << algo.name;
  a->eval();
  EXPECT_FALSE(torch::allclose(a->apply_weight(W, 1.0), W)) << algo.name;
}

// apply_weight(W, m) == W + m·ΔW for a random host weight W: an adapter's ΔW against its formula, written out
// by the caller from the adapter's own tensors.
inline void expect_delta(AdapterImpl& a, const torch::Tensor& dW, double m, double tol, const std::string& what = "") {
  const auto W = torch::randn(dW.sizes(), dW.options());
  torch::NoGradGuard g;
  EXPECT_TRUE(all_close(a.apply_weight(W, m), W + m * dW, tol, tol, what + " W' = W + m·ΔW"));
}

// The generic checks of a fresh adapter of `algo` for each named set of options, on every host layer the
// algorithm supports: W' = W at init; then, with random parameters, bypass == rebuild (m = 0.7 and 1), the
// file round trip through `algo`'s loader, fp16 / bf16 hosts and module dropout; autograd against finite
// differences (evaluation mode) on the Linear layer and the 2-D conv.
inline void expect_generic_adapter(const Algorithm& algo,
                                   const std::vector<std::pair<std::string, AdapterOptions>>& variants) {
  const auto layers = host_layers();
  for (const auto& [what, options] : variants) {
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& l = layers[i];
      if (algo.supports && !algo.supports(l)) continue;
      const std::string where = what + " on " + l.describe();
      SCOPED_TRACE(where);
      auto a = algo.create(l, options);
      {
        auto W = torch::randn(l.weight_shape());
        torch::NoGradGuard g;
        EXPECT_TRUE(all_close(a->apply_weight(W, 1.0), W, 1e-6, 1e-6, "W' = W at init"));  // (DoRA: ‖W‖ taken here)
      }
      randomize(*a);
      a->to(torch::kFloat64);
      expect_bypass_equals_rebuild(*a, l, 0.7, where);
      expect_bypass_equals_rebuild(*a, l, 1.0, where);
      expect_round_trip(*a, algo, l, where);
      if (i == 0 || i == 2) expect_gradients_match(*a, l, 0.7, where);  // after the round trip: evaluation mode
      expect_low_precision_host(*a, l, where);
      expect_module_dropout(algo, options, l);
    }
  }
}

// --- golden cases ---

inline nlohmann::json golden_case(const std::string& name) {
  std::ifstream in(data_path("golden/manifest.json"));
  auto m = nlohmann::json::parse(in);
  for (auto& c : m["cases"])
    if (c["name"] == name) return c;
  ADD_FAILURE() << "no golden case " << name;
  return {};
}

// The LayerSpec of a wrapped module of the "mini" template.
inline LayerSpec golden_layer(const nlohmann::json& c, const nlohmann::json& mod, bool has_bias) {
  std::ifstream in(data_path("golden/manifest.json"));
  auto manifest = nlohmann::json::parse(in);
  const auto& tmpl = manifest["templates"][c["model"]["template"].get<std::string>()]["modules"][mod["module"].get<std::string>()];
  const std::string kind = mod["kind"];
  auto shape = mod["weight_shape"].get<std::vector<int64_t>>();
  if (kind == "Linear") return LayerSpec::linear(shape[1], shape[0], has_bias);
  if (kind == "LayerNorm") return LayerSpec::layer_norm(shape[0], tmpl["eps"].get<double>(), has_bias);
  if (kind == "GroupNorm")
    return LayerSpec::group_norm(c["model"]["dims"]["groups"].get<int64_t>(), shape[0], tmpl["eps"].get<double>(),
                                 has_bias);
  return LayerSpec::conv(shape[1], shape[0], tmpl["kernel_size"].get<std::vector<int64_t>>(),
                         tmpl["stride"].get<std::vector<int64_t>>(), tmpl["padding"].get<std::vector<int64_t>>(),
                         tmpl["dilation"].get<std::vector<int64_t>>(), 1, has_bias);
}

// Loads every module of the case that `algos` detects, and checks merged weights (m = 1 and 0.7) and the
// recorded module outputs (rebuild and bypass at m = 1). Returns the number of modules checked.
inline int check_golden(const std::string& name, const std::vector<Algorithm>& algos) {
  auto c = golden_case(name);
  const std::string dir = data_path("golden/" + name + "/");
  auto base = io::SafetensorsFile::open(dir + "base.safetensors");
  auto adapter = io::SafetensorsFile::open(dir + "adapter.safetensors");
  auto io_file = io::SafetensorsFile::open(dir + "io.safetensors");
  auto modules = group_modules(adapter);
  const double watol = c["tolerance"]["weights"]["atol"], wrtol = c["tolerance"]["weights"]["rtol"];
  const double oatol = c["tolerance"]["outputs"]["atol"], ortol = c["tolerance"]["outputs"]["rtol"];
  int checked = 0;
  for (auto& mod : c["modules"]) {
    const std::string path = mod["module"], lname = mod["lycoris_name"];
    auto it = modules.find(lname);
    if (it == modules.end()) continue;
    const Algorithm* algo = nullptr;
    for (auto& a : algos)
      if (a.detect(it->second)) { algo = &a; break; }
    if (!algo) continue;
    SCOPED_TRACE(name + ": " + path + " (" + algo->name + ")");
    const bool has_bias = base.contains(path + ".bias");
    auto layer = golden_layer(c, mod, has_bias);
    auto ad = algo->load(lname, it->second, layer);
    ad->eval();
    auto W = base.tensor(path + ".weight");
    auto b = has_bias ? base.tensor(path + ".bias") : torch::Tensor();
    torch::NoGradGuard g;
    for (auto [file, m] : {std::pair<std::string, double>{"merged_m1", 1.0}, {"merged_m07", 0.7}}) {
      auto merged = io::SafetensorsFile::open(dir + file + ".safetensors");
      EXPECT_TRUE(all_close(ad->apply_weight(W, m), merged.tensor(path + ".weight"), watol, wrtol, file + " weight"));
      if (has_bias)
        EXPECT_TRUE(all_close(ad->apply_bias(b, m), merged.tensor(path + ".bias"), watol, wrtol, file + " bias"));
    }
    if (io_file.contains("x." + path)) {
      auto x = io_file.tensor("x." + path);
      auto y_rebuild = layer_forward(x, layer, ad->apply_weight(W, 1.0), ad->apply_bias(b, 1.0));
      EXPECT_TRUE(all_close(y_rebuild, io_file.tensor("y_rebuild." + path), oatol, ortol, "y_rebuild"));
      EXPECT_TRUE(all_close(ad->bypass_forward(x, W, b, 1.0), io_file.tensor("y_bypass." + path), oatol, ortol,
                            "y_bypass"));
    }
    ++checked;
  }
  return checked;
}

}  // namespace lycoris::test
