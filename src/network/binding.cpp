// Rebuild-mode binding of adapters into unmodified torch layers (network.hpp, docs/training.md#stacking).
//
// Each bound layer has one Binding: its original parameters W0/b0 (the registered ones, frozen while
// bound) and the ordered list of attached adapters (one per network). The layer's `weight` member is set to
//   W' = W0 + Σ_i (W_i − W0),  W_i = adapter_i.apply_weight(W0, m_i)   (one adapter: W' = W_1 exactly)
// and likewise the bias when some adapter changes it. The last adapter out assigns W0/b0 back.
#include <torch/torch.h>

#include <mutex>
#include <unordered_map>

#include "internal.hpp"
#include "lycoris/error.hpp"

namespace lycoris::detail {

namespace {

// Versions of an adapter's parameters when its W_i was computed: a backward through W' after they changed
// (optimizer step without refresh) is the "forgot to refresh" mistake.
struct Snapshot {
  std::string name;
  std::vector<torch::Tensor> params;
  std::vector<uint32_t> versions;
};

struct Entry {
  const void* owner;
  std::string name, path;
  AdapterPtr adapter;
  std::shared_ptr<const double> multiplier;
  torch::Tensor W, b;  // apply_weight / apply_bias results
  std::shared_ptr<Snapshot> snapshot;
};

struct Binding {
  torch::Tensor* wm = nullptr;
  torch::Tensor* bm = nullptr;
  torch::Tensor W0, b0;
  bool w_rg = false, b_rg = false;  // requires_grad of W0/b0 before binding
  std::vector<Entry> entries;
};

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

std::unordered_map<const torch::nn::Module*, std::shared_ptr<Binding>>& registry() {
  static std::unordered_map<const torch::nn::Module*, std::shared_ptr<Binding>> r;
  return r;
}

void compute(Binding& b, Entry& e) {
  e.W = e.adapter->apply_weight(b.W0, *e.multiplier);
  e.b = e.adapter->apply_bias(b.b0, *e.multiplier);
  auto snap = std::make_shared<Snapshot>();
  snap->name = e.name;
  for (const auto& p : e.adapter->parameters()) {
    snap->params.push_back(p);
    snap->versions.push_back(p._version());
  }
  e.snapshot = std::move(snap);
}

void check_fresh(const std::vector<std::shared_ptr<Snapshot>>& snaps) {
  for (const auto& s : snaps)
    for (size_t i = 0; i < s->params.size(); ++i)
      if (s->params[i]._version() != s->versions[i])
        throw Error("lycoris: backward through stale adapted weights of " + s->name +
                    ": the adapter parameters changed (optimizer step) since the weights were computed; call "
                    "network->on_step() (or refresh()) after every optimizer.step(), before the next forward");
}

void guard(torch::Tensor& t, const std::vector<std::shared_ptr<Snapshot>>& snaps) {
  if (!t.defined() || !t.requires_grad() || snaps.empty()) return;
  t.register_hook([snaps](torch::Tensor grad) {
    check_fresh(snaps);
    return grad;
  });
}

bool changed(const torch::Tensor& t, const torch::Tensor& original) {
  return t.defined() && !(original.defined() && t.is_same(original));
}

void rebind(Binding& b) {
  torch::Tensor W = b.W0, B = b.b0;
  std::vector<std::shared_ptr<Snapshot>> snaps;
  if (b.entries.size() == 1) {
    const auto& e = b.entries.front();
    W = e.W;
    if (changed(e.b, b.b0)) B = e.b;
  } else {
    for (const auto& e : b.entries) {
      if (changed(e.W, b.W0)) W = W + (e.W - b.W0);
      if (changed(e.b, b.b0)) {
        auto delta = b.b0.defined() ? e.b - b.b0 : e.b;
        B = B.defined() ? B + delta : delta;
      }
    }
  }
  for (const auto& e : b.entries)
    if ((e.W.defined() && e.W.requires_grad()) || (e.b.defined() && e.b.requires_grad())) snaps.push_back(e.snapshot);
  guard(W, snaps);
  if (!B.is_same(b.b0)) guard(B, snaps);
  *b.wm = W;
  *b.bm = B;
}

std::shared_ptr<Binding> find_binding(const torch::nn::Module& host) {
  auto it = registry().find(&host);
  return it == registry().end() ? nullptr : it->second;
}

}  // namespace

torch::Tensor* weight_member(torch::nn::Module& host) {
  if (auto* l = dynamic_cast<torch::nn::LinearImpl*>(&host)) return &l->weight;
  if (auto* c = dynamic_cast<torch::nn::Conv1dImpl*>(&host)) return &c->weight;
  if (auto* c = dynamic_cast<torch::nn::Conv2dImpl*>(&host)) return &c->weight;
  if (auto* c = dynamic_cast<torch::nn::Conv3dImpl*>(&host)) return &c->weight;
  if (auto* n = dynamic_cast<torch::nn::LayerNormImpl*>(&host)) return &n->weight;
  if (auto* n = dynamic_cast<torch::nn::GroupNormImpl*>(&host)) return &n->weight;
  return nullptr;
}

torch::Tensor* bias_member(torch::nn::Module& host) {
  if (auto* l = dynamic_cast<torch::nn::LinearImpl*>(&host)) return &l->bias;
  if (auto* c = dynamic_cast<torch::nn::Conv1dImpl*>(&host)) return &c->bias;
  if (auto* c = dynamic_cast<torch::nn::Conv2dImpl*>(&host)) return &c->bias;
  if (auto* c = dynamic_cast<torch::nn::Conv3dImpl*>(&host)) return &c->bias;
  if (auto* n = dynamic_cast<torch::nn::LayerNormImpl*>(&host)) return &n->bias;
  if (auto* n = dynamic_cast<torch::nn::GroupNormImpl*>(&host)) return &n->bias;
  return nullptr;
}

void bind(const NetworkModule& m, const void* owner, std::shared_ptr<const double> multiplier) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& slot = registry()[m.host.get()];
  const bool fresh = !slot;
  if (fresh) {
    auto b = std::make_shared<Binding>();
    b->wm = weight_member(*m.host);
    b->bm = bias_member(*m.host);
    if (!b->wm || !b->wm->defined()) {
      registry().erase(m.host.get());
      throw OptionError(m.name + ": layer '" + m.path + "' has no weight to adapt");
    }
    b->W0 = *b->wm;
    b->b0 = *b->bm;
    b->w_rg = b->W0.requires_grad();
    b->b_rg = b->b0.defined() && b->b0.requires_grad();
    slot = b;
  }
  auto& b = *slot;
  Entry e{owner, m.name, m.path, m.adapter, std::move(multiplier), {}, {}, nullptr};
  try {
    // frozen while bound: gradients reach only the adapters
    b.W0.requires_grad_(false);
    if (b.b0.defined()) b.b0.requires_grad_(false);
    compute(b, e);
  } catch (...) {
    if (fresh) {
      b.W0.requires_grad_(b.w_rg);
      if (b.b0.defined()) b.b0.requires_grad_(b.b_rg);
      registry().erase(m.host.get());
    }
    throw;
  }
  auto& list = b.entries;
  list.erase(std::remove_if(list.begin(), list.end(), [&](const Entry& x) { return x.owner == owner; }), list.end());
  list.push_back(std::move(e));
  rebind(b);
}

void unbind(const torch::nn::Module& host, const void* owner) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto b = find_binding(host);
  if (!b) return;
  auto& list = b->entries;
  const auto before = list.size();
  list.erase(std::remove_if(list.begin(), list.end(), [&](const Entry& x) { return x.owner == owner; }), list.end());
  if (list.size() == before) return;
  if (!list.empty()) {
    rebind(*b);
    return;
  }
  *b->wm = b->W0;
  *b->bm = b->b0;
  b->W0.requires_grad_(b->w_rg);
  if (b->b0.defined()) b->b0.requires_grad_(b->b_rg);
  registry().erase(&host);
}

void recompute(const torch::nn::Module& host, const void* owner) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto b = find_binding(host);
  if (!b) return;
  bool any = false;
  for (auto& e : b->entries)
    if (e.owner == owner) {
      compute(*b, e);
      any = true;
    }
  if (any) rebind(*b);
}

void recompute_all(const torch::nn::Module& host) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto b = find_binding(host);
  if (!b) return;
  for (auto& e : b->entries) compute(*b, e);
  rebind(*b);
}

std::pair<torch::Tensor, torch::Tensor> base_weights(torch::nn::Module& host) {
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    if (auto b = find_binding(host)) return {b->W0, b->b0};
  }
  auto* w = weight_member(host);
  auto* bias = bias_member(host);
  return {w ? *w : torch::Tensor(), bias ? *bias : torch::Tensor()};
}

void set_base_bias(torch::nn::Module& host, const torch::Tensor& bias) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  if (auto b = find_binding(host)) b->b0 = bias;
  if (auto* m = bias_member(host)) *m = bias;
}

}  // namespace lycoris::detail
