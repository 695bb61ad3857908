// lycoris::distributed::DataParallel: rank 0's adapter on every rank, the structure check, and the gradient
// average by bucketed all-reduces started from autograd hooks (docs/training.md#distributed).
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include <map>
#include <mutex>

#include "distributed/group_impl.hpp"
#include "lycoris/checkpoint.hpp"
#include "lycoris/text.hpp"

namespace lycoris::distributed {

// Gradients in flattened buckets. A bucket's all-reduce starts when the last of its parameters' gradient
// accumulators has run; buckets start strictly in index order (c10d matches collectives by their order on
// each rank, so every rank must start the same buckets in the same order, whatever order its backward
// produced the gradients in). After backward (an autograd engine callback) the remaining buckets start, all
// are waited for, and each gradient becomes sum / world size.
struct DataParallel::Reducer : std::enable_shared_from_this<DataParallel::Reducer> {
  struct Bucket {
    std::vector<size_t> members;  // indices into params
    std::vector<int64_t> offsets;
    int64_t numel = 0;
    torch::Tensor flat;
    int64_t pending = 0;
    c10::intrusive_ptr<c10d::Work> work;
  };

  ProcessGroupPtr group;
  std::vector<torch::Tensor> params;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;  // kept alive: they hold the hooks
  std::vector<Bucket> buckets;
  std::vector<size_t> bucket_of;
  std::vector<char> ready;
  size_t next_launch = 0;
  bool in_backward = false;
  int no_sync = 0;
  CommStats stats;
  std::mutex mutex;

  void build(const std::vector<torch::Tensor>& trainable, int64_t bucket_bytes);
  void install_hooks();
  void on_gradient(size_t index);
  void launch(size_t b);
  void finalize();
};

namespace {

struct GradientReadyHook : torch::autograd::FunctionPostHook {
  GradientReadyHook(std::weak_ptr<DataParallel::Reducer> r, size_t i) : reducer(std::move(r)), index(i) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    if (auto r = reducer.lock()) r->on_gradient(index);
    return outputs;
  }
  std::weak_ptr<DataParallel::Reducer> reducer;
  size_t index;
};

std::string bucket_what(size_t b, size_t n) {
  return "all-reduce of gradient bucket " + std::to_string(b + 1) + "/" + std::to_string(n);
}

}  // namespace

void DataParallel::Reducer::build(const std::vector<torch::Tensor>& trainable, int64_t bucket_bytes) {
  params.assign(trainable.rbegin(), trainable.rend());  // backward meets the last layers first
  bucket_of.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    const bool fits = !buckets.empty() &&
                      (buckets.back().numel * static_cast<int64_t>(p.element_size()) + bytes <= bucket_bytes) &&
                      params[buckets.back().members.front()].options().type_equal(p.options());
    if (!fits) buckets.emplace_back();
    auto& b = buckets.back();
    b.members.push_back(i);
    b.offsets.push_back(b.numel);
    b.numel += p.numel();
    bucket_of[i] = buckets.size() - 1;
  }
  for (auto& b : buckets) b.flat = torch::empty({b.numel}, params[b.members.front()].options());
  ready.assign(params.size(), 0);
}

void DataParallel::Reducer::install_hooks() {
  for (size_t i = 0; i < params.size(); ++i) {
    auto acc = torch::autograd::impl::grad_accumulator(params[i]);
    acc->add_post_hook(std::make_unique<GradientReadyHook>(weak_from_this(), i));
    accumulators.push_back(std::move(acc));
  }
}

void DataParallel::Reducer::on_gradient(size_t index) {
  std::lock_guard<std::mutex> lock(mutex);
  if (no_sync > 0) return;
  if (!in_backward) {
    in_backward = true;
    std::fill(ready.begin(), ready.end(), 0);
    for (auto& b : buckets) b.pending = static_cast<int64_t>(b.members.size()), b.work.reset();
    next_launch = 0;
    torch::autograd::Engine::get_default_engine().queue_callback([weak = weak_from_this()] {
      if (auto r = weak.lock()) r->finalize();
    });
  }
  if (ready[index]) return;
  ready[index] = 1;
  --buckets[bucket_of[index]].pending;
  while (next_launch < buckets.size() && buckets[next_launch].pending == 0) launch(next_launch++);
}

void DataParallel::Reducer::launch(size_t b) {
  auto& bucket = buckets[b];
  torch::NoGradGuard no_grad;
  for (size_t k = 0; k < bucket.members.size(); ++k) {
    const auto& p = params[bucket.members[k]];
    auto slot = bucket.flat.narrow(0, bucket.offsets[k], p.numel());
    if (p.grad().defined())
      slot.copy_(p.grad().reshape(-1));
    else
      slot.zero_();  // no gradient on this rank this time (module dropout): it adds nothing
  }
  std::vector<torch::Tensor> ts{bucket.flat};
  auto& g = group->impl();
  bucket.work = g.start(bucket_what(b, buckets.size()), [&] { return g.group->allreduce(ts); });
  stats.bytes += bucket.numel * static_cast<int64_t>(bucket.flat.element_size());
}

void DataParallel::Reducer::finalize() {
  std::lock_guard<std::mutex> lock(mutex);
  in_backward = false;
  const auto start = std::chrono::steady_clock::now();
  while (next_launch < buckets.size()) launch(next_launch++);
  const double n = static_cast<double>(group->world_size());
  torch::NoGradGuard no_grad;
  for (size_t b = 0; b < buckets.size(); ++b) {
    auto& bucket = buckets[b];
    group->impl().wait(bucket.work, bucket_what(b, buckets.size()));
    bucket.work.reset();
    bucket.flat.div_(n);
    for (size_t k = 0; k < bucket.members.size(); ++k) {
      auto& p = params[bucket.members[k]];
      auto slot = bucket.flat.narrow(0, bucket.offsets[k], p.numel()).view(p.sizes());
      if (p.grad().defined())
        p.mutable_grad().copy_(slot);
      else
        p.mutable_grad() = slot.clone();
    }
  }
  stats.exposed_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ++stats.reductions;
}

// ---------------------------------------------------------------- DataParallel

DataParallel::DataParallel(LycorisNetwork network, ProcessGroupPtr group, DataParallelOptions options)
    : network_(std::move(network)), group_(std::move(group)), reducer_(std::make_shared<Reducer>()) {
  if (!network_) throw OptionError("DataParallel: the network is empty");
  if (!group_) throw OptionError("DataParallel: the process group is empty");
  if (options.bucket_bytes() < 1) throw OptionError("DataParallel: bucket_bytes must be positive");
  check_structure_();
  broadcast_from_rank0();
  std::vector<torch::Tensor> trainable;
  for (const auto& p : network_->parameters())
    if (p.requires_grad()) trainable.push_back(p);
  reducer_->group = group_;
  reducer_->build(trainable, options.bucket_bytes());
  reducer_->install_hooks();
}

DataParallel::~DataParallel() = default;

std::string DataParallel::structure() const {
  // the checkpoint's structure text, plus which parameters train (they decide the buckets)
  std::string trainable;
  for (const auto& p : network_->named_parameters()) trainable += p.value().requires_grad() ? "1" : "0";
  return network_structure(*network_) + "trainable " + trainable + "\n";
}

void DataParallel::check_structure_() {
  const auto mine = structure();
  const std::string what = "comparing the adapter structure";
  auto size = torch::tensor({static_cast<int64_t>(mine.size())}, torch::kLong).to(group_->device());
  auto sizes = group_->all_gather(size, what);
  int64_t longest = 1;
  for (const auto& s : sizes) longest = std::max(longest, s.item<int64_t>());
  auto bytes = torch::zeros({longest}, torch::kUInt8);
  std::memcpy(bytes.data_ptr(), mine.data(), mine.size());
  auto texts = group_->all_gather(bytes.to(group_->device()), what);
  auto text_of = [&](size_t r) {
    auto t = texts[r].cpu();
    return std::string(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(sizes[r].item<int64_t>()));
  };
  const auto reference = text_of(0);
  for (size_t r = 1; r < texts.size(); ++r) {
    const auto diff = structure_difference(reference, text_of(r), "rank 0", "rank " + std::to_string(r));
    if (diff.empty()) continue;
    throw DistributedError("distributed: the adapter of rank " + std::to_string(r) + " differs from rank 0's: " + diff +
                           " (every rank must build the same network: model, preset and options)");
  }
}

void DataParallel::broadcast_from_rank0() {
  // one broadcast per dtype: the tensors flattened end to end
  std::map<std::string, std::vector<torch::Tensor>> by_type;
  for (const auto& p : network_->parameters()) by_type[c10::toString(p.scalar_type())].push_back(p);
  for (const auto& b : network_->buffers()) by_type[c10::toString(b.scalar_type())].push_back(b);
  for (auto& [type, tensors] : by_type) {
    torch::NoGradGuard no_grad;  // (not around refresh(): W' must carry the adapters' graph)
    std::vector<torch::Tensor> flat;
    for (const auto& t : tensors) flat.push_back(t.reshape(-1).to(group_->device()));
    auto all = torch::cat(flat);
    group_->broadcast(all, 0, "broadcasting the adapter " + type + " tensors from rank 0");
    int64_t at = 0;
    for (auto& t : tensors) {
      t.copy_(all.narrow(0, at, t.numel()).view(t.sizes()));
      at += t.numel();
    }
  }
  sync_step_states_();
  network_->refresh();
}

void DataParallel::sync_step_states_() {
  // what on_step() drew besides tensors (DyLoRA's block count): rank 0's, everywhere. The sizes are the same on
  // every rank (the structures matched), so one broadcast of the concatenation carries them all.
  std::vector<int64_t> all;
  std::vector<size_t> sizes;
  for (const auto& m : network_->modules()) {
    const auto state = m.adapter->step_state();
    sizes.push_back(state.size());
    all.insert(all.end(), state.begin(), state.end());
  }
  if (all.empty()) return;
  auto values = torch::tensor(all, torch::kLong).to(group_->device());
  group_->broadcast(values, 0, "broadcasting the adapters' per-step draws (DyLoRA's blocks) from rank 0");
  values = values.cpu().contiguous();
  const int64_t* v = values.data_ptr<int64_t>();
  size_t at = 0;
  for (size_t k = 0; k < sizes.size(); ++k) {
    if (sizes[k] == 0) continue;
    network_->modules()[k].adapter->set_step_state(std::vector<int64_t>(v + at, v + at + sizes[k]));
    at += sizes[k];
  }
}

void DataParallel::on_step() {
  for (const auto& m : network_->modules()) m.adapter->on_step();
  sync_step_states_();
  network_->refresh();
}

void DataParallel::step(torch::optim::Optimizer& optimizer) {
  optimizer.step();
  optimizer.zero_grad();
  on_step();
}

const CommStats& DataParallel::stats() const { return reducer_->stats; }
void DataParallel::reset_stats() { reducer_->stats = CommStats(); }
int64_t DataParallel::buckets() const { return static_cast<int64_t>(reducer_->buckets.size()); }
int64_t DataParallel::gradient_bytes() const {
  int64_t total = 0;
  for (const auto& b : reducer_->buckets) total += b.numel * static_cast<int64_t>(b.flat.element_size());
  return total;
}

DataParallel::NoSync::NoSync(DataParallel& owner) : owner_(owner) {
  std::lock_guard<std::mutex> lock(owner_.reducer_->mutex);
  ++owner_.reducer_->no_sync;
}
DataParallel::NoSync::~NoSync() {
  std::lock_guard<std::mutex> lock(owner_.reducer_->mutex);
  --owner_.reducer_->no_sync;
}

}  // namespace lycoris::distributed
