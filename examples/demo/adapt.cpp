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

  // 1. A fresh frozen copy of the base model, wrapped: only the adapter's parameters train.
  torch::manual_seed(config.seed);
  auto model = load_base(model_config, base_path);
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  auto options = NetworkOptions()
                     .conv_dim(spec.conv_dim)
                     .conv_alpha(spec.conv_alpha)
                     .train_norm(spec.train_norm)
                     .module(spec.module);
  auto net = create_lycoris(model, 1.0, spec.dim, spec.alpha, options);
  r.modules = static_cast<int64_t>(net->modules().size());
  net->apply_to();
  net->train();
  std::vector<torch::Tensor> params;
  for (auto& p : net->parameters())
    if (p.requires_grad()) {
      params.push_back(p);
      r.trainable += p.numel();
    }
  if (params.empty()) throw Error(spec.label + ": the network has no trainable parameters");

  // 2. Train on the new classes.
  torch::optim::Adam opt(params, torch::optim::AdamOptions(spec.lr));
  Progress bar("  train " + spec.label, config.steps, progress);
  double train_ms = 0, avg = 0;
  for (int64_t step = 0; step < config.steps; ++step) {
    set_lr(opt, spec.lr, step, config.steps);
    auto [x, y] = sample_batch(data.new_train, config.batch);
    const auto t0 = std::chrono::steady_clock::now();
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    net->on_step();  // per-step adapter state (DyLoRA) + recompute the bound weights
    train_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const double l = loss.item<double>();
    if (!std::isfinite(l)) throw Error(spec.label + ": loss is " + std::to_string(l) + " at step " + std::to_string(step));
    avg = step == 0 ? l : 0.95 * avg + 0.05 * l;
    char status[32];
    std::snprintf(status, sizeof status, "loss %.3f", avg);
    bar.tick(1, status);
  }
  bar.finish();
  r.final_loss = avg;
  r.ms_per_step = config.steps > 0 ? train_ms / static_cast<double>(config.steps) : 0;

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
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_row).count();
  return r;
}

}  // namespace lycoris::demo
