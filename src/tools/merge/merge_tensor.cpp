#include "tools/merge/merge_tensor.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <numeric>
#include <optional>

#include "exec/scratch.hpp"
#include "exec/worker_pool.hpp"
#include "lycoris/adapter.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"

namespace lycoris::tools {

namespace {

using RowKernels = std::vector<std::unique_ptr<RowKernel>>;

// Rows per chunk: a chunk of exec::kChunkElements, but at least this many rows: every chunk's addmm/mm packs
// the whole (r, cols) right factor again, so a chunk of a few rows of a wide layer (1280·9 columns: 5 rows)
// spent more time packing than multiplying (LoHa's compute at SD1.5 scale: 1.4 s with 1 row minimum, 1.05 s
// with 32; measured 16–128).
constexpr int64_t kMinChunkRows = 32;

// Σ V² per column of the rows V (a chunk's share of the column norms of DoRA's V): summed in V's dtype
// (as the reference's norm does; a sum with dtype=fp64 converts every element first, 4× slower) and
// returned in fp64, in which the chunks' shares accumulate.
torch::Tensor column_square_sums(const torch::Tensor& V) { return V.square().sum(0).to(torch::kFloat64); }

// The row kernel of every step in the compute dtype on the CPU, or none when a step has none (a bias step,
// an algorithm or layout without one) or x does not suit the chunked path.
RowKernels step_kernels(const torch::Tensor& x, const torch::Tensor& out, const std::vector<MergeStep>& steps,
                        torch::ScalarType compute) {
  RowKernels kernels;
  if (x.dim() < 2 || x.numel() == 0 || !out.is_contiguous() || !x.is_contiguous()) return kernels;
  for (const auto& s : steps) {
    if (s.bias) return {};
    auto k = s.adapter->row_kernel(s.m, x.options().dtype(compute), x.sizes());
    if (!k) return {};
    kernels.push_back(std::move(k));
  }
  return kernels;
}

// Row-chunked path: each chunk of rows is converted to the compute dtype, goes through every kernel, is
// checked and rounded into `out` while it is in cache; chunks run in parallel on the worker pool. Whether
// the result is finite in out's dtype, or nullopt when the rows cannot be split in the kernels' blocks.
std::optional<bool> merge_rows(const torch::Tensor& x, const torch::Tensor& out, const RowKernels& kernels,
                               torch::ScalarType compute) {
  const int64_t O = x.size(0), cols = x.numel() / O;
  int64_t block = 1;
  for (const auto& k : kernels) block = std::lcm(block, k->block);
  if (O % block != 0) return std::nullopt;
  const int64_t rows = std::max<int64_t>(std::max<int64_t>(1, kMinChunkRows / block),
                                         exec::kChunkElements / std::max<int64_t>(cols, 1) / block) *
                       block;
  const int64_t chunks = (O + rows - 1) / rows;
  const int workers = static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), chunks));
  auto x2 = x.view({O, cols}), o2 = out.view({O, cols});
  std::atomic<bool> finite{true};
  // One pass per column-norm DoRA step (from x again, through the steps before it: Σ V² per column over
  // all rows, which that step needs before it can scale), then the pass that writes `out`. Only the
  // last pass writes, so `out` may be `x`.
  for (size_t upto = 0;; ++upto) {
    while (upto < kernels.size() && !kernels[upto]->needs_columns()) ++upto;
    const bool last = upto == kernels.size();
    std::vector<torch::Tensor> sums(static_cast<size_t>(workers));  // per worker: no lock, no race
    exec::WorkerPool::shared().run(chunks, workers, [&](int64_t c, int worker) {
      const int64_t r0 = c * rows, r1 = std::min(O, r0 + rows);
      // the rows in a buffer of this (persistent) worker: no allocation, no fresh pages per chunk
      thread_local torch::Tensor buffer;
      auto W = exec::scratch(buffer, r1 - r0, cols, x.options().dtype(compute));
      functional::convert_into(W, x2.narrow(0, r0, r1 - r0));
      for (size_t i = 0; i < upto; ++i) kernels[i]->apply(W, r0, r1);
      if (!last) {
        kernels[upto]->add(W, r0, r1);
        auto& acc = sums[static_cast<size_t>(worker)];
        acc = acc.defined() ? acc.add_(column_square_sums(W)) : column_square_sums(W);
        return;
      }
      // checked against the output dtype: what is written must be finite after its rounding
      if (!functional::finite_in(W, out.scalar_type())) finite = false;
      functional::convert_into(o2.narrow(0, r0, r1 - r0), W);
    });
    if (last) return finite.load();
    torch::Tensor total;
    for (const auto& s : sums)
      if (s.defined()) total = total.defined() ? total.add_(s) : s;
    kernels[upto]->set_column_sums(total);
  }
}

// W ← the step applied to the whole of W (compute dtype, any device) in place.
void apply_whole(torch::Tensor& W, const MergeStep& s) {
  auto& adapter = *s.adapter;
  if (s.bias) {
    W.copy_(adapter.apply_bias(W, s.m));
    return;
  }
  if (auto k = adapter.row_kernel(s.m, W.options(), W.sizes())) {
    auto W2 = W.view({W.size(0), -1});
    k->add(W2, 0, W.size(0));
    if (k->needs_columns()) k->set_column_sums(column_square_sums(W2));
    if (k->scale) k->scale(W2, 0, W.size(0));
    return;
  }
  // additive adapters the kernels do not cover (Tucker, DyLoRA, factors in another dtype): W += m·ΔW in
  // place, ΔW as the module builds it
  auto dw = adapter.additive_delta();
  if (dw.defined() && functional::compute_dtype(dw) == W.scalar_type()) {
    W.add_(dw.reshape(W.sizes()).to(W.device(), W.scalar_type()), s.m);
    return;
  }
  W.copy_(adapter.apply_weight(W, s.m));
}

}  // namespace

torch::Tensor step_rows(const torch::Tensor& W, const MergeStep& s) {
  if (!s.ranged()) return W;
  if (W.dim() < 1 || s.row_begin < 0 || s.row_begin >= s.row_end || s.row_end > W.size(0))
    throw ShapeError("merge: rows [" + std::to_string(s.row_begin) + ", " + std::to_string(s.row_end) +
                     ") of a tensor of shape " + functional::shape_str(W.sizes()));
  return W.narrow(0, s.row_begin, s.row_end - s.row_begin);
}

bool merge_tensor(const torch::Tensor& x, const torch::Tensor& out, const std::vector<MergeStep>& steps,
                  torch::Device device) {
  const auto compute = x.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  const bool cpu = device.is_cpu() && x.device().is_cpu() && out.device().is_cpu();
  // Steps on a row block (fused q/k/v: small tensors) take the whole-tensor path below.
  bool ranged = false;
  for (const auto& s : steps) {
    step_rows(x, s);  // checks the range
    ranged = ranged || s.ranged();
  }
  if (cpu && !ranged) {
    auto kernels = step_kernels(x, out, steps, compute);
    if (!kernels.empty())
      if (auto finite = merge_rows(x, out, kernels, compute)) return *finite;
  }
  auto W = x.to(device, compute, /*non_blocking=*/false, /*copy=*/true);
  for (const auto& s : steps) {
    auto rows = step_rows(W, s);  // a view: the step writes into W
    apply_whole(rows, s);
  }
  const bool finite = functional::finite_in(W, out.scalar_type());
  out.copy_(W);
  return finite;
}

}  // namespace lycoris::tools
