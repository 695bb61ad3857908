// The main demo's reusable pieces (shared by examples/demo/main.cpp and tests/examples/demo_test.cpp):
// Fashion-MNIST data, a small base model with every layer kind LyCORIS targets, pretraining with a
// cache, adapter training through the network API, evaluation, and the report (table, CSV, Markdown,
// gnuplot PNG). docs/demo.md describes the experiment.
#pragma once
#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lycoris/distributed.hpp"
#include "lycoris/options.hpp"

namespace lycoris::demo {

// ------------------------------------------------------------------------------------------ progress
// A progress bar with rate and ETA on stderr. On a terminal it redraws one line ('\r', at most ~10×/s);
// otherwise it prints a single summary line when finished, so logs stay readable.
class Progress {
 public:
  Progress(std::string label, int64_t total, bool enabled = true);
  ~Progress();
  // Advance by n; `status` (e.g. "loss 0.41") is shown after the bar.
  void tick(int64_t n = 1, const std::string& status = "");
  void finish(const std::string& status = "");

 private:
  void draw(bool final);
  std::string label_, status_;
  int64_t total_, done_ = 0;
  bool enabled_, tty_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

// ------------------------------------------------------------------------------------------ data
// One labelled set: images (N, 1, 28, 28) float32, normalised; labels (N,) int64 in [0, 10).
struct Split {
  torch::Tensor images, labels;
  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
  Split subset(const torch::Tensor& index) const;
};

// The demo's four sets: old classes (0–4) and new classes (5–9), train and test.
struct Data {
  Split old_train, new_train, old_test, new_test;
};

constexpr int64_t kOldClasses = 5;  // classes 0…4 are "old" (pretraining), 5…9 "new" (adaptation)

// $LYCORIS_FASHION_MNIST or /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist).
std::string default_data_dir();
// Reads the gzip IDX files of `dir`; keeps at most max_train / max_test images per group (old/new;
// 0 = all), a deterministic subset. A missing or corrupt file is a lycoris::Error naming the file and
// the apt-get command that installs the data.
Data load_data(const std::string& dir, int64_t max_train = 0, int64_t max_test = 0);

// ------------------------------------------------------------------------------------------ model
// A small classifier over 28×28 grey images with the layer kinds LyCORIS adapts:
//   conv1 3×3/2 → gn1 (GroupNorm) → SiLU → conv2 3×3/2 → gn2 → SiLU → (+ conv3 1×1 → SiLU)
//   → 49 tokens → attn block (LayerNorm, q/k/v/proj Linear, 4 heads, residual) → mean
//   → fc (Linear) → SiLU → head (Linear, 10 classes)
// All layers are stock torch::nn modules, so the network layer can wrap them without model changes.
struct ModelConfig {
  int64_t width = 32;  // channels after conv2 = token dimension
  int64_t heads = 4;
};

struct AttentionImpl : torch::nn::Module {
  AttentionImpl(int64_t dim, int64_t heads);
  torch::Tensor forward(const torch::Tensor& x);  // (B, T, dim) → (B, T, dim), residual included
  int64_t heads;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear q{nullptr}, k{nullptr}, v{nullptr}, proj{nullptr};
};
TORCH_MODULE(Attention);

struct BaseModelImpl : torch::nn::Module {
  explicit BaseModelImpl(ModelConfig config = {});
  torch::Tensor forward(const torch::Tensor& x);  // (B, 1, 28, 28) → logits (B, 10)
  ModelConfig config;
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::GroupNorm gn1{nullptr}, gn2{nullptr};
  Attention attn{nullptr};
  torch::nn::Linear fc{nullptr}, head{nullptr};
};
TORCH_MODULE(BaseModel);

// The model's parameters and buffers by dotted name (what base/merged files hold), detached, contiguous.
std::vector<std::pair<std::string, torch::Tensor>> model_tensors(torch::nn::Module& model);
// Writes model_tensors (fp32) with `metadata` through io::SafetensorsWriter (atomic).
void save_model(torch::nn::Module& model, const std::string& path,
                const std::map<std::string, std::string>& metadata = {});
// Copies every tensor of `path` into the model. Error naming the file and key on a missing key or a
// shape mismatch.
void load_model(torch::nn::Module& model, const std::string& path);
// A fresh model with the weights of `path`.
BaseModel load_base(const ModelConfig& config, const std::string& path);

// ------------------------------------------------------------------------------------------ training
// Random batch of `batch` images from `split` (sampling with replacement, torch's global generator).
std::pair<torch::Tensor, torch::Tensor> sample_batch(const Split& split, int64_t batch);

struct PretrainConfig {
  int64_t steps = 1000, batch = 128;
  double lr = 2e-3;
  uint64_t seed = 0;
};
// Trains every parameter of the model on `train` (Adam, cosine decay; cross-entropy over the logits of
// classes 0–4 only), returns the last loss average.
double pretrain(BaseModel& model, const Split& train, const PretrainConfig& config, bool progress = true);

// Logits for a whole split in eval mode, no grad, in chunks. `forward` defaults to the model's forward.
torch::Tensor predict(const std::function<torch::Tensor(const torch::Tensor&)>& forward, const Split& split,
                      int64_t chunk = 1000);
// Share of correct argmax over all 10 classes; `among` restricts the argmax to classes [lo, hi).
double accuracy(const torch::Tensor& logits, const torch::Tensor& labels, int64_t lo = 0, int64_t hi = 10);

// Pretrains (or reuses) the base model cached at `path`: reused when the file exists, was written for
// the same model config (and, if `strict`, the same pretraining settings), and `retrain` is false.
BaseModel pretrained_base(const ModelConfig& model_config, const PretrainConfig& config, const Split& old_train,
                          const std::string& path, bool retrain, bool progress = true, bool strict = true);

// ------------------------------------------------------------------------------------------ algorithms
// One row of the comparison: the network options of one algorithm with the reference's recommended
// settings (docs/demo.md lists them with their source).
struct AlgoSpec {
  std::string label;  // row and file name: "lora", "lokr-small", "lokr-large", ...
  std::string algo;   // registry name
  int64_t dim = 8;    // linear_dim (and conv_dim unless conv_dim > 0)
  double alpha = 1;   // linear_alpha (and conv_alpha)
  int64_t conv_dim = 0;
  double conv_alpha = 0;
  AdapterOptions module;  // factor, full_matrix, block_size, constraint, rescaled, ...
  bool train_norm = false;
  double lr = 1e-3;
  std::string settings;  // human-readable summary for the table
};

// All rows, in table order: lora, loha, lokr-small, lokr-large, full, ia3, dylora, glora, glokr,
// diag-oft, boft.
std::vector<AlgoSpec> algo_specs();
// The rows selected by a comma list of labels or registry names ("lokr" selects both LoKr rows);
// empty = all. OptionError listing the known labels on an unknown name.
std::vector<AlgoSpec> select_algos(const std::string& list);

struct AdaptConfig {
  int64_t steps = 250, batch = 128;
  uint64_t seed = 1;
  int64_t diff_samples = 512;  // test images compared between merged and unmerged model
  // Data-parallel (--nproc, torchrun): every rank draws the same global batch and trains on its shard of it;
  // rank 0 evaluates and writes. Rank 0 first times `reference_steps` one-process steps (the speed-up).
  distributed::ProcessGroupPtr group;
  int64_t reference_steps = 20;
};

struct AlgoResult {
  std::string label, algo, settings;
  int64_t trainable = 0;   // trainable adapter values
  int64_t file_bytes = 0;  // adapter-<label>.safetensors
  int64_t modules = 0;     // adapted layers
  double ms_per_step = 0;  // forward + backward + optimizer step (+ refresh), averaged
  int64_t processes = 1;   // data-parallel ranks that trained it
  double one_process_ms_per_step = 0;  // with processes > 1: the same step in one process (rank 0 alone)
  double all_reduce_ms_per_step = 0;   // with processes > 1: waiting for gradient all-reduces after backward
  double new_acc = 0;      // new-class test images, 10-way, adapter applied (unmerged)
  double new_acc_merged = 0;  // same on the merged model
  double old_acc = 0;      // old-class test images, 10-way, merged model (forgetting)
  double old_acc_within = 0;  // old-class test images, argmax among classes 0–4 only, merged model
  double max_diff = 0;     // max |merged − unmerged| logits over diff_samples test images
  double final_loss = 0;
  double seconds = 0;      // wall time of the whole row
  std::string adapter_path, merged_path;
};

// Trains one adapter on a fresh copy of the base model (base_path) on the new classes, saves it as
// <out>/adapter-<label>.safetensors, reloads it from the file onto another fresh copy, merges it and saves
// <out>/merged-<label>.safetensors; evaluates as described in AlgoResult.
AlgoResult adapt(const AlgoSpec& spec, const ModelConfig& model_config, const std::string& base_path,
                 const Data& data, const AdaptConfig& config, const std::string& out_dir, bool progress = true);

// ------------------------------------------------------------------------------------------ report
struct BaseInfo {
  double old_acc = 0, new_acc = 0;  // base model, 10-way
  int64_t parameters = 0, file_bytes = 0;
};

// The table as Markdown (also printed) and CSV.
std::string markdown_table(const BaseInfo& base, const std::vector<AlgoResult>& rows);
std::string csv_table(const std::vector<AlgoResult>& rows);
// Writes <out>/results.csv, <out>/results.md and, if gnuplot is installed, <out>/accuracy_vs_size.png
// (accuracy vs adapter file size, log x). Returns the PNG path, or "" (with a note on stderr) without
// gnuplot.
std::string write_report(const std::string& out_dir, const BaseInfo& base, const std::vector<AlgoResult>& rows);

}  // namespace lycoris::demo
