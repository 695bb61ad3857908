// Demo data, base model, its file I/O, pretraining and evaluation.
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>

#include "demo.hpp"
#include "idx.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"

namespace lycoris::demo {

// ------------------------------------------------------------------------------------------ data

Split Split::subset(const torch::Tensor& index) const {
  return {images.index_select(0, index), labels.index_select(0, index)};
}

std::string default_data_dir() {
  const char* env = std::getenv("LYCORIS_FASHION_MNIST");
  return env && *env ? env : "/usr/share/datasets/fashion-mnist";
}

namespace {

constexpr double kMean = 0.2860, kStd = 0.3530;  // Fashion-MNIST training-set pixel statistics

// The images of one class group (old: label < 5, new: label ≥ 5), at most `max` (0 = all), in file order.
Split group(const data::LabeledImages& set, bool new_classes, int64_t max) {
  auto mask = new_classes ? set.labels.ge(kOldClasses) : set.labels.lt(kOldClasses);
  auto index = mask.nonzero().squeeze(1);
  if (max > 0 && index.size(0) > max) index = index.slice(0, 0, max);
  return {set.images.index_select(0, index).sub(kMean).div(kStd), set.labels.index_select(0, index)};
}

}  // namespace

Data load_data(const std::string& dir, int64_t max_train, int64_t max_test) {
  data::LabeledImages train, test;
  try {
    train = data::read_idx_dataset(dir, "train");
    test = data::read_idx_dataset(dir, "t10k");
  } catch (const Error& e) {
    throw IOError(std::string(e.what()) +
                  " — the demo needs Fashion-MNIST: sudo apt-get install -y dataset-fashion-mnist "
                  "(or set LYCORIS_FASHION_MNIST to a directory with the four *-ubyte.gz files)");
  }
  if (train.images.size(2) != 28 || train.images.size(3) != 28 || test.images.size(2) != 28 ||
      test.images.size(3) != 28)
    throw FormatError(dir + ": expected 28×28 images (Fashion-MNIST), got " + std::to_string(train.images.size(2)) +
                      "×" + std::to_string(train.images.size(3)));
  if (train.labels.max().item<int64_t>() >= 10 || test.labels.max().item<int64_t>() >= 10)
    throw FormatError(dir + ": labels must be 0…9 (Fashion-MNIST)");
  return {group(train, false, max_train), group(train, true, max_train), group(test, false, max_test),
          group(test, true, max_test)};
}

// ------------------------------------------------------------------------------------------ model

AttentionImpl::AttentionImpl(int64_t dim, int64_t heads_) : heads(heads_) {
  norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
  q = register_module("q", torch::nn::Linear(dim, dim));
  k = register_module("k", torch::nn::Linear(dim, dim));
  v = register_module("v", torch::nn::Linear(dim, dim));
  proj = register_module("proj", torch::nn::Linear(dim, dim));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), d = C / heads;
  auto h = norm(x);
  auto split = [&](const torch::Tensor& t) { return t.view({B, T, heads, d}).transpose(1, 2); };  // (B, H, T, d)
  auto att = torch::softmax(torch::matmul(split(q(h)), split(k(h)).transpose(-2, -1)) / std::sqrt(double(d)), -1);
  auto out = torch::matmul(att, split(v(h))).transpose(1, 2).reshape({B, T, C});
  return x + proj(out);
}

BaseModelImpl::BaseModelImpl(ModelConfig config_) : config(config_) {
  const int64_t w = config.width, w1 = std::max<int64_t>(8, w / 2);
  namespace nn = torch::nn;
  conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(1, w1, 3).stride(2).padding(1)));
  gn1 = register_module("gn1", nn::GroupNorm(nn::GroupNormOptions(4, w1)));
  conv2 = register_module("conv2", nn::Conv2d(nn::Conv2dOptions(w1, w, 3).stride(2).padding(1)));
  gn2 = register_module("gn2", nn::GroupNorm(nn::GroupNormOptions(8, w)));
  conv3 = register_module("conv3", nn::Conv2d(nn::Conv2dOptions(w, w, 1)));
  attn = register_module("attn", Attention(w, config.heads));
  fc = register_module("fc", nn::Linear(w, w));
  head = register_module("head", nn::Linear(w, 10));
}

torch::Tensor BaseModelImpl::forward(const torch::Tensor& x) {
  auto h = torch::silu(gn1(conv1(x)));   // (B, w/2, 14, 14)
  h = torch::silu(gn2(conv2(h)));        // (B, w, 7, 7)
  h = h + torch::silu(conv3(h));         // 1×1 channel mixing, residual
  h = h.flatten(2).transpose(1, 2);      // (B, 49, w) tokens
  h = attn(h).mean(1);                   // (B, w)
  return head(torch::silu(fc(h)));       // (B, 10)
}

std::vector<std::pair<std::string, torch::Tensor>> model_tensors(torch::nn::Module& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : model.named_parameters()) out.emplace_back(p.key(), p.value().detach().contiguous());
  for (const auto& b : model.named_buffers()) out.emplace_back(b.key(), b.value().detach().contiguous());
  return out;
}

void save_model(torch::nn::Module& model, const std::string& path, const std::map<std::string, std::string>& metadata) {
  auto tensors = model_tensors(model);
  for (auto& [name, t] : tensors) t = t.to(torch::kCPU, torch::kFloat32).contiguous();
  io::save_file(path, tensors, metadata);
}

void load_model(torch::nn::Module& model, const std::string& path) {
  auto file = io::SafetensorsFile::open(path);
  torch::NoGradGuard no_grad;
  auto copy = [&](const std::string& name, torch::Tensor& dst) {
    if (!file.contains(name)) throw KeyError(path + ": missing tensor '" + name + "'");
    auto src = file.tensor(name);
    if (src.sizes() != dst.sizes())
      throw ShapeError(path + ": tensor '" + name + "' has shape " + std::string(c10::str(src.sizes())) +
                       ", the model needs " + std::string(c10::str(dst.sizes())));
    dst.copy_(src);
  };
  for (auto& p : model.named_parameters()) copy(p.key(), p.value());
  for (auto& b : model.named_buffers()) copy(b.key(), b.value());
}

BaseModel load_base(const ModelConfig& config, const std::string& path) {
  BaseModel model(config);
  load_model(*model, path);
  return model;
}

// ------------------------------------------------------------------------------------------ training

std::pair<torch::Tensor, torch::Tensor> sample_batch(const Split& split, int64_t batch) {
  auto index = torch::randint(split.size(), {batch}, torch::kLong);
  return {split.images.index_select(0, index), split.labels.index_select(0, index)};
}

double pretrain(BaseModel& model, const Split& train, const PretrainConfig& config, bool progress) {
  torch::manual_seed(config.seed);
  model->train();
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(config.lr));
  Progress bar("pretrain (0-4)", config.steps, progress);
  double avg = 0;
  for (int64_t step = 0; step < config.steps; ++step) {
    // cosine decay to 5 % of the base rate
    const double t = static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, config.steps));
    for (auto& group : opt.param_groups())
      static_cast<torch::optim::AdamOptions&>(group.options()).lr(config.lr * (0.05 + 0.95 * 0.5 * (1 + std::cos(M_PI * t))));
    auto [x, y] = sample_batch(train, config.batch);
    // Only the old classes' logits enter the loss: the head's rows for classes 5–9 stay at their random
    // initialisation (unused outputs) instead of being pushed to −∞, which the adapters would first have
    // to undo.
    auto loss = torch::nn::functional::cross_entropy(model->forward(x).slice(1, 0, kOldClasses), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    const double l = loss.item<double>();
    avg = step == 0 ? l : 0.95 * avg + 0.05 * l;
    char status[32];
    std::snprintf(status, sizeof status, "loss %.3f", avg);
    bar.tick(1, status);
  }
  bar.finish();
  model->eval();
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  return avg;
}

torch::Tensor predict(const std::function<torch::Tensor(const torch::Tensor&)>& forward, const Split& split,
                      int64_t chunk) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parts;
  for (int64_t i = 0; i < split.size(); i += chunk)
    parts.push_back(forward(split.images.slice(0, i, std::min(split.size(), i + chunk))));
  return parts.empty() ? torch::empty({0, 10}) : torch::cat(parts);
}

double accuracy(const torch::Tensor& logits, const torch::Tensor& labels, int64_t lo, int64_t hi) {
  if (labels.size(0) == 0) return 0;
  auto pred = logits.slice(1, lo, hi).argmax(1) + lo;
  return pred.eq(labels).to(torch::kFloat64).mean().item<double>();
}

BaseModel pretrained_base(const ModelConfig& model_config, const PretrainConfig& config, const Split& old_train,
                          const std::string& path, bool retrain, bool progress, bool strict) {
  // The cache key: everything that determines the pretrained weights.
  const std::map<std::string, std::string> meta = {
      {"lycoris_demo", "base v2"},
      {"width", std::to_string(model_config.width)},
      {"heads", std::to_string(model_config.heads)},
      {"pretrain_steps", std::to_string(config.steps)},
      {"pretrain_batch", std::to_string(config.batch)},
      {"pretrain_lr", std::to_string(config.lr)},
      {"pretrain_seed", std::to_string(config.seed)},
      {"train_images", std::to_string(old_train.size())}};
  if (!retrain && std::filesystem::exists(path)) {
    std::string why;
    try {
      auto file = io::SafetensorsFile::open(path);
      for (const auto& [k, v] : meta) {
        if (!strict && k != "lycoris_demo" && k != "width" && k != "heads") continue;
        auto it = file.metadata().find(k);
        if (it == file.metadata().end() || it->second != v) {
          why = "written with other settings (" + k + ")";
          break;
        }
      }
      if (why.empty()) {
        auto model = load_base(model_config, path);
        model->eval();
        for (auto& p : model->parameters()) p.set_requires_grad(false);
        if (progress) std::fprintf(stderr, "base model: reusing %s (--retrain to train it again)\n", path.c_str());
        return model;
      }
    } catch (const Error& e) {
      why = e.what();
    }
    if (progress) std::fprintf(stderr, "base model: %s is not usable (%s); training it again\n", path.c_str(), why.c_str());
  }
  torch::manual_seed(config.seed);  // initial weights, then the batch order inside pretrain()
  BaseModel model(model_config);
  pretrain(model, old_train, config, progress);
  save_model(*model, path, meta);
  return model;
}

}  // namespace lycoris::demo
