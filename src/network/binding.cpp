// Rebuild-mode binding of adapters into host layers, reached through their HostLayer view (network.hpp,
// docs/training.md#stacking).
//
// Each bound layer has one Binding: its original parameters W0/b0 (the registered ones, frozen while
// bound) and the ordered list of attached adapters (one per network). The layer's forward weight is set to
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

struct Attachment {
  const void* owner;
  std::string name, path;
  AdapterPtr adapter;
  std::shared_ptr<const double> multiplier;
  torch::Tensor W, b;  // apply_weight / apply_bias results
  std::shared_ptr<Snapshot> snapshot;
};

struct Binding {
  HostLayerPtr layer;  // the view of the first network bound here
  torch::Tensor W0, b0;
  bool w_rg = false, b_rg = false;  // requires_grad of W0/b0 before binding
  std::vector<Attachment> entries;
};

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

// keyed by HostLayer::identity()
std::unordered_map<const void*, std::shared_ptr<Binding>>& registry() {
  static std::unordered_map<const void*, std::shared_ptr<Binding>> r;
  return r;
}

void compute(Binding& b, Attachment& e) {
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
  b.layer->bind(W, B);
}

std::shared_ptr<Binding> find_binding(const HostLayer& layer) {
  auto it = registry().find(layer.identity());
  return it == registry().end() ? nullptr : it->second;
}

}  // namespace

const HostLayer& adaptable_layer(const NetworkModule& m) {
  if (!m.view || !m.view->weight().defined())
    throw OptionError(m.name + ": layer '" + m.path + "' has no weight to adapt");
  return *m.view;
}

void bind(const NetworkModule& m, const void* owner, std::shared_ptr<const double> multiplier) {
  adaptable_layer(m);
  std::lock_guard<std::mutex> lock(registry_mutex());
  const void* key = m.view->identity();
  auto& slot = registry()[key];
  const bool fresh = !slot;
  if (fresh) {
    auto b = std::make_shared<Binding>();
    b->layer = m.view;
    b->W0 = m.view->weight();
    b->b0 = m.view->bias();
    b->w_rg = b->W0.requires_grad();
    b->b_rg = b->b0.defined() && b->b0.requires_grad();
    slot = b;
  }
  auto& b = *slot;
  Attachment e{owner, m.name, m.path, m.adapter, std::move(multiplier), {}, {}, nullptr};
  try {
    // frozen while bound: gradients reach only the adapters
    b.W0.requires_grad_(false);
    if (b.b0.defined()) b.b0.requires_grad_(false);
    compute(b, e);
  } catch (...) {
    if (fresh) {
      b.W0.requires_grad_(b.w_rg);
      if (b.b0.defined()) b.b0.requires_grad_(b.b_rg);
      registry().erase(key);
    }
    throw;
  }
  auto& list = b.entries;
  list.erase(std::remove_if(list.begin(), list.end(), [&](const Attachment& x) { return x.owner == owner; }), list.end());
  list.push_back(std::move(e));
  rebind(b);
}

void unbind(const HostLayer& layer, const void* owner) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto b = find_binding(layer);
  if (!b) return;
  auto& list = b->entries;
  const auto before = list.size();
  list.erase(std::remove_if(list.begin(), list.end(), [&](const Attachment& x) { return x.owner == owner; }), list.end());
  if (list.size() == before) return;
  if (!list.empty()) {
    rebind(*b);
    return;
  }
  b->layer->restore(b->W0, b->b0);
  b->W0.requires_grad_(b->w_rg);
  if (b->b0.defined()) b->b0.requires_grad_(b->b_rg);
  registry().erase(layer.identity());
}

void recompute(const HostLayer& layer, const void* owner) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto b = find_binding(layer);
  if (!b) return;
  bool any = false;
  for (auto& e : b->entries)
    if (e.owner == owner) {
      compute(*b, e);
      any = true;
    }
  if (any) rebind(*b);
}

void recompute_all(const HostLayer& layer) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto b = find_binding(layer);
  if (!b) return;
  for (auto& e : b->entries) compute(*b, e);
  rebind(*b);
}

std::pair<torch::Tensor, torch::Tensor> base_weights(const HostLayer& layer) {
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    if (auto b = find_binding(layer)) return {b->W0, b->b0};
  }
  return {layer.weight(), layer.bias()};
}

bool stale(const HostLayer& layer, const void* owner) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto b = find_binding(layer);
  if (!b) return false;
  for (const auto& e : b->entries)
    if (e.owner == owner && e.snapshot)
      for (size_t i = 0; i < e.snapshot->params.size(); ++i)
        if (e.snapshot->params[i]._version() != e.snapshot->versions[i]) return true;
  return false;
}

void freeze_base(const HostLayer& layer) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  if (auto b = find_binding(layer)) b->w_rg = b->b_rg = false;
}

void set_base_bias(const HostLayer& layer, const torch::Tensor& bias) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  if (auto b = find_binding(layer)) b->b0 = bias;
}

}  // namespace lycoris::detail
