// One row of the comparison: train an adapter on the new classes through the network API, save it,
// reload it from the file onto a fresh base model, merge, save the merged model, evaluate both.
#include <chrono>
#include <cmath>
#include <filesystem>

#include "demo.hpp"
#include "lycoris/error.hpp"
#include "lycoris/network.hpp"

namespace lycoris::demo {

namespace {

// Cosine decay from lr to 5 % of lr over the run (same schedule as pretraining).
void set_lr(torch::optim::Adam& opt, double lr, int64_t step, int64_t steps) {
  const double t = static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, steps));
  for (auto& group : opt.param_groups())
    static_cast<torch::optim::AdamOptions&>(group.options()).lr(lr * (0.05 + 0.95 * 0.5 * (1 + std::cos(M_PI * t))));
}

// The first n/2 old-class and n/2 new-class test images: the inputs compared between merged and unmerged.
Split diff_split(const Data& data, int64_t n) {
  auto part = [&](const Split& s) {
    return s.subset(torch::arange(std::min<int64_t>(s.size(), n / 2), torch::kLong));
  };
  auto a = part(data.old_test), b = part(data.new_test);
  return {torch::cat({a.images, b.images}), torch::cat({a.labels, b.labels})};
}

struct Trained {
  BaseModel model{nullptr};
  LycorisNetwork net{nullptr};
  int64_t trainable = 0;
  double ms_per_step = 0, all_reduce_ms_per_step = 0, final_loss = 0;
};

// A fresh frozen copy of the base model with the adapter of `spec`, trained on the new classes. With a group
// of several ranks, every rank draws the same global batch (same seed) and trains on its shard of it; the
// gradients are averaged by DataParallel, so the adapter is the one-process adapter of the global batch.
Trained train_new_classes(const AlgoSpec& spec, const ModelConfig& model_config, const std::string& base_path,
                          const Data& data, const AdaptConfig& config, bool progress) {
  Trained t;
  torch::manual_seed(config.seed);
  t.model = load_base(model_config, base_path);
  auto& model = t.model;
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  auto options = NetworkOptions()
                     .conv_dim(spec.conv_dim)
                     .conv_alpha(spec.conv_alpha)
                     .train_norm(spec.train_norm)
                     .module(spec.module);
  t.net = create_lycoris(model, 1.0, spec.dim, spec.alpha, options);
  auto& net = t.net;
  net->apply_to();
  net->train();
  std::vector<torch::Tensor> params;
  for (auto& p : net->parameters())
    if (p.requires_grad()) {
      params.push_back(p);
      t.trainable += p.numel();
    }
  if (params.empty()) throw Error(spec.label + ": the network has no trainable parameters");
  const int64_t ranks = config.group ? config.group->world_size() : 1;
  if (config.batch % ranks != 0)
    throw OptionError("the batch " + std::to_string(config.batch) + " is not divisible by " + std::to_string(ranks) +
                      " processes");
  std::unique_ptr<distributed::DataParallel> ddp;
  if (ranks > 1) ddp = std::make_unique<distributed::DataParallel>(net, config.group);
  const int64_t shard = config.batch / ranks, first = config.group ? config.group->rank() * shard : 0;

  torch::optim::Adam opt(params, torch::optim::AdamOptions(spec.lr));
  Progress bar("  train " + spec.label, config.steps, progress);
  double train_ms = 0, avg = 0;
  for (int64_t step = 0; step < config.steps; ++step) {
    set_lr(opt, spec.lr, step, config.steps);
    auto [x, y] = sample_batch(data.new_train, config.batch);
    const auto t0 = std::chrono::steady_clock::now();
    x = x.narrow(0, first, shard), y = y.narrow(0, first, shard);  // this rank's shard (all of it alone)
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    opt.zero_grad();
    loss.backward();  // with ddp: the gradients are averaged over the ranks here
    opt.step();
    ddp ? ddp->on_step() : net->on_step();  // per-step adapter state (DyLoRA) + recompute the bound weights
    train_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const double l = loss.item<double>();
    if (!std::isfinite(l))
      throw Error(spec.label + ": loss is " + std::to_string(l) + " at step " + std::to_string(step));
    avg = step == 0 ? l : 0.95 * avg + 0.05 * l;
    char status[32];
    std::snprintf(status, sizeof status, "loss %.3f", avg);
    bar.tick(1, status);
  }
  bar.finish();
  t.final_loss = avg;
  const double steps = static_cast<double>(std::max<int64_t>(1, config.steps));
  t.ms_per_step = config.steps > 0 ? train_ms / steps : 0;
  if (ddp) t.all_reduce_ms_per_step = ddp->stats().exposed_seconds * 1000 / steps;
  return t;
}

}  // namespace

AlgoResult adapt(const AlgoSpec& spec, const ModelConfig& model_config, const std::string& base_path,
                 const Data& data, const AdaptConfig& config, const std::string& out_dir, bool progress) {
  namespace fs = std::filesystem;
  const auto t_row = std::chrono::steady_clock::now();
  AlgoResult r;
  r.label = spec.label;
  r.algo = spec.algo;
  r.settings = spec.settings + ", lr " + [&] {
    char b[16];
    std::snprintf(b, sizeof b, "%g", spec.lr);
    return std::string(b);
  }();
  r.adapter_path = (fs::path(out_dir) / ("adapter-" + spec.label + ".safetensors")).string();
  r.merged_path = (fs::path(out_dir) / ("merged-" + spec.label + ".safetensors")).string();
  const auto forward_of = [](BaseModel& m) { return [m](const torch::Tensor& x) mutable { return m->forward(x); }; };

  // 0. Data-parallel: rank 0 times the one-process step first (the others wait), for the speed-up.
  const auto& group = config.group;
  const bool leader = !group || group->rank() == 0;
  if (group && group->world_size() > 1) {
    if (leader) {
      AdaptConfig alone = config;
      alone.group = nullptr;
      alone.steps = config.reference_steps;
      r.one_process_ms_per_step = train_new_classes(spec, model_config, base_path, data, alone, false).ms_per_step;
    }
    group->barrier("the one-process timing of " + spec.label);
  }

  // 1. + 2. A fresh frozen copy of the base model, wrapped (only the adapter's parameters train), trained on
  // the new classes.
  auto trained = train_new_classes(spec, model_config, base_path, data, config, progress && leader);
  auto& model = trained.model;
  auto& net = trained.net;
  r.modules = static_cast<int64_t>(net->modules().size());
  r.trainable = trained.trainable;
  r.final_loss = trained.final_loss;
  r.ms_per_step = trained.ms_per_step;
  r.processes = group ? group->world_size() : 1;
  r.all_reduce_ms_per_step = trained.all_reduce_ms_per_step;
  if (!leader) {  // rank 0 evaluates and writes; the others wait for it
    group->barrier("rank 0 evaluating " + spec.label);
    net->restore();
    return r;
  }

  // 3. Evaluate the unmerged model (adapter applied, evaluation mode) and save the adapter.
  net->eval();
  net->refresh();
  r.new_acc = accuracy(predict(forward_of(model), data.new_test), data.new_test.labels);
  const auto probe = diff_split(data, config.diff_samples);
  const auto unmerged = predict(forward_of(model), probe);
  net->save_weights(r.adapter_path, torch::kFloat, {{"lycoris_demo_row", spec.label}});
  r.file_bytes = static_cast<int64_t>(fs::file_size(r.adapter_path));

  // 4. Reload the adapter from its file onto a fresh base model and merge it: merged = base + this adapter.
  auto merged = load_base(model_config, base_path);
  for (auto& p : merged->parameters()) p.set_requires_grad(false);
  {
    auto loaded = create_lycoris_from_weights(merged, r.adapter_path, 1.0);
    if (loaded->modules().size() != net->modules().size())
      throw Error(r.adapter_path + ": reloaded " + std::to_string(loaded->modules().size()) + " modules, trained " +
                  std::to_string(net->modules().size()));
    loaded->merge_to(1.0);
  }
  merged->eval();
  save_model(*merged, r.merged_path, {{"lycoris_demo", "merged"}, {"adapter", spec.label}});
  const auto old_logits = predict(forward_of(merged), data.old_test);
  r.old_acc = accuracy(old_logits, data.old_test.labels);
  r.old_acc_within = accuracy(old_logits, data.old_test.labels, 0, kOldClasses);
  r.new_acc_merged = accuracy(predict(forward_of(merged), data.new_test), data.new_test.labels);
  r.max_diff = (predict(forward_of(merged), probe) - unmerged).abs().max().item<double>();

  net->restore();
  if (group) group->barrier("rank 0 evaluating " + spec.label);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_row).count();
  return r;
}

}  // namespace lycoris::demo
