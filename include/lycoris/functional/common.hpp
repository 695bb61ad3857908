// Small helpers shared by every algorithm's functional code (one home each).
#pragma once
#include <memory>
#include <torch/types.h>

#include <string>
#include <vector>

#include "lycoris/adapter.hpp"
#include "lycoris/layer.hpp"

namespace lycoris::functional {

// The single value of a 0-dim or shape-(1,) numeric tensor (any dtype: fp16/bf16/fp32/int64 …), read
// at the full precision of its stored dtype (FORMAT.md §4.1). ShapeError naming `module.key` otherwise.
double scalar_value(const torch::Tensor& t, const std::string& module, const std::string& key);
// The tensor stored under `key`, or KeyError "<module>: missing key '<key>' (has: …)".
const torch::Tensor& require(const TensorMap& tensors, const std::string& key, const std::string& module);
// The tensor stored under `key`, or an undefined tensor.
torch::Tensor optional(const TensorMap& tensors, const std::string& key);
// ShapeError "<module>.<key>: expected shape [..], got [..] (<why>)" unless t has exactly `expected`.
void expect_shape(const torch::Tensor& t, torch::IntArrayRef expected, const std::string& module,
                  const std::string& key, const std::string& why = "");
// T reshaped to 2-D keeping the first axis: (T.size(0), numel / T.size(0)).
torch::Tensor flat(const torch::Tensor& t);
// The dtype ΔW math runs in: fp64 for fp64 inputs, fp32 otherwise.
torch::ScalarType compute_dtype(const torch::Tensor& like);
// t converted to the compute dtype of `like` (no copy when it already is).
torch::Tensor to_compute(const torch::Tensor& t, const torch::Tensor& like);
// "[3, 4, 1, 1]"
std::string shape_str(torch::IntArrayRef shape);

}  // namespace lycoris::functional

namespace lycoris::functional {

// --- ops shared by the low-rank algorithms' bypass paths (no bias, groups 1) ---
// The host layer's own op with weight w (linear, or convNd with the host's stride, padding, dilation).
torch::Tensor host_op(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& w);
// A pointwise projection with a 2-D weight (out, in): linear on the last axis, or a 1×…×1 convNd with
// stride 1 and no padding on the channel axis for conv layers.
torch::Tensor pointwise_op(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& w2d);
// A 2-D matrix (out, in) viewed as a weight of `ndim` dims with trailing singleton axes: (out, in, 1, …).
torch::Tensor with_unit_kernel(const torch::Tensor& w2d, int64_t ndim);

// --- training-time dropouts (TRAINING.md §3) ---
// True when module dropout skips the adapter for this call: training and one uniform u < p.
bool module_dropped(double module_dropout, bool training);
// 0/1 keep mask of n entries, keep iff u > p (u uniform per entry); with `rescale` divided by its mean
// (an all-zero mask stays zero instead of becoming 0/0, QUIRKS Q47).
torch::Tensor keep_mask(int64_t n, double p, bool rescale, const torch::TensorOptions& options);
// ΔW with whole output rows dropped (the reference's rebuild-mode "rank dropout", QUIRKS Q26).
torch::Tensor drop_rows(const torch::Tensor& dw, double p, bool rescale);

}  // namespace lycoris::functional

namespace lycoris::functional {

// --- loading helpers ---
// KeyError "<module>: unknown key(s) 'k', … for <algo> (allowed: …)" when a key is not in `allowed`.
void expect_keys(const TensorMap& tensors, const std::vector<std::string>& allowed, const std::string& module,
                 const std::string& algo);
// Empty when an additive weight algorithm can wrap the layer (Linear or Conv1d/2d/3d with groups 1 and a
// non-empty weight), otherwise the reason (grouped convs are rejected, QUIRKS Q45).
std::string unsupported_layer(const LayerSpec& layer);
// Empty when every dimension of the layer's weight is at least 1, otherwise the reason ("Linear(8, 0) has an
// empty weight [0, 8]"): there is nothing to adapt (a base tensor with a zero dimension).
std::string empty_weight(const LayerSpec& layer);
// FormatError "<module>: rank 0 (<key> has shape [..])" when rank < 1: empty low-rank factors are no
// adapter (their scale alpha / rank is 0 / 0), whatever layer they are loaded for.
void expect_rank(int64_t rank, const torch::Tensor& t, const std::string& module, const std::string& key);
// A writable copy of a file tensor as a parameter value: fp64 stays fp64, every other dtype becomes fp32
// (as the reference copies into fp32 parameters).
torch::Tensor owned_float(const torch::Tensor& t);
// Anonymous memory of at least `bytes`, 2 MiB-aligned, in transparent huge pages where the system allows
// (madvise mode) and populated before it is returned. On a VM with shadow paging the first touch of each
// 4 KiB page in a process costs ~1.5–4 µs (0.2–0.5 s for 136 MB); huge pages populated up front cost
// ~10 ms for the same block. nullptr when mapping fails; release with unmap_populated(p, size).
void* map_populated(size_t bytes, size_t& mapped_size);
void unmap_populated(void* p, size_t mapped_size);

// While one is alive, owned_float on this thread takes its results from one populated block of `bytes`
// (the tensors keep the block alive), so that loading an adapter touches fresh memory in one go.
// Results that do not fit get ordinary allocations.
class OwnedFloatArena {
 public:
  explicit OwnedFloatArena(size_t bytes);
  ~OwnedFloatArena();
  OwnedFloatArena(const OwnedFloatArena&) = delete;
  OwnedFloatArena& operator=(const OwnedFloatArena&) = delete;
  // Bytes owned_float takes for a tensor of `numel` elements (fp64: 8 bytes each, else 4; aligned).
  static size_t bytes_for(uint64_t numel, bool fp64);

 private:
  friend torch::Tensor owned_float(const torch::Tensor& t);
  struct Block;
  std::shared_ptr<Block> block_;
  size_t used_ = 0;
  OwnedFloatArena* previous_;
};

// dst ← src (same shape, both contiguous), converting the dtype: fp16 ↔ fp32 on CPU with the F16C
// instructions where the CPU has them (torch 1.13 converts one element at a time, ~10× slower), else copy_.
void convert_into(const torch::Tensor& dst, const torch::Tensor& src);

}  // namespace lycoris::functional

