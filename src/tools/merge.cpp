// `lycoris merge`: streaming, three-stage pipeline (see include/lycoris/tools/merge.hpp).
#include "lycoris/tools/merge.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include <torch/torch.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>
#include <unordered_map>

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <limits>
#include <numeric>
#include <typeinfo>

#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/dora.hpp"
#include "lycoris/functional/lokr.hpp"
#include "lycoris/io/rewriter.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/modules/dylora.hpp"
#include "lycoris/modules/ia3.hpp"
#include "lycoris/modules/loha.hpp"
#include "lycoris/modules/lokr.hpp"
#include "lycoris/modules/lora.hpp"
#include "lycoris/naming.hpp"
#include "lycoris/version.hpp"
#include "../io/atomic_file.hpp"  // io::detail::pread_full
#include "single_threaded_blas.hpp"

namespace lycoris::tools {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

bool is_float(io::DType d) {
  switch (d) {
    case io::DType::F64:
    case io::DType::F32:
    case io::DType::F16:
    case io::DType::BF16:
    case io::DType::F8_E4M3:
    case io::DType::F8_E5M2: return true;
    default: return false;
  }
}

bool has_torch_dtype(io::DType d) { return d != io::DType::F8_E4M3 && d != io::DType::F8_E5M2; }

// A FIFO with a capacity; close() ends it (pop returns false once drained), abort() drops everything.
template <class T>
class BoundedQueue {
 public:
  explicit BoundedQueue(size_t capacity) : capacity_(capacity) {}
  bool push(T item) {
    std::unique_lock<std::mutex> lock(mu_);
    not_full_.wait(lock, [&] { return aborted_ || items_.size() < capacity_; });
    if (aborted_) return false;
    items_.push_back(std::move(item));
    not_empty_.notify_one();
    return true;
  }
  bool pop(T& item) {
    std::unique_lock<std::mutex> lock(mu_);
    not_empty_.wait(lock, [&] { return aborted_ || closed_ || !items_.empty(); });
    if (aborted_ || items_.empty()) return false;
    item = std::move(items_.front());
    items_.pop_front();
    not_full_.notify_one();
    return true;
  }
  void close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    not_empty_.notify_all();
  }
  void abort() {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    items_.clear();
    not_empty_.notify_all();
    not_full_.notify_all();
  }

 private:
  size_t capacity_;
  std::mutex mu_;
  std::condition_variable not_full_, not_empty_;
  std::deque<T> items_;
  bool closed_ = false, aborted_ = false;
};

// One adapter module applied to one base tensor.
struct Step {
  const AdapterModule* module;
  size_t adapter;  // index in options.adapters
  MergeStep step;  // the adapter at its weight, weight or bias, and the rows (fused q/k/v) it applies to
};

struct Item {
  size_t index = 0;
  int slot = -1;       // read buffer of the pool holding `data`
  torch::Tensor data;  // the base tensor as read (raw bytes as uint8 for F8 dtypes), a view of the slot
  torch::Tensor out;   // merged / converted tensor to write when it is not `data` itself; undefined → `data`
};

// The read buffers: `count` slots of `bytes` each, allocated on first use and recycled by the writer.
// Fixed buffers instead of a fresh tensor per item keep the peak memory known and avoid the page faults
// of fresh allocations (each slot is faulted in once).
class SlotPool {
 public:
  SlotPool(size_t count, uint64_t bytes) : free_(count), bufs_(count), bytes_(bytes) {
    for (size_t i = 0; i < count; ++i) free_.push(i);
  }
  // A free slot (blocks while all are in flight); -1 once aborted.
  int acquire() {
    size_t i = 0;
    if (!free_.pop(i)) return -1;
    if (!bufs_[i].defined()) bufs_[i] = torch::empty({static_cast<int64_t>(std::max<uint64_t>(bytes_, 1))}, torch::kUInt8);
    return static_cast<int>(i);
  }
  void release(int i) {
    if (i >= 0) free_.push(static_cast<size_t>(i));
  }
  void* data(int i) { return bufs_[static_cast<size_t>(i)].data_ptr(); }
  void abort() { free_.abort(); }

 private:
  BoundedQueue<size_t> free_;
  std::vector<torch::Tensor> bufs_;
  uint64_t bytes_;
};

class Reader {
 public:
  explicit Reader(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw IOError(path + ": cannot open: " + std::strerror(errno));
#ifdef POSIX_FADV_SEQUENTIAL
    posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
#endif
  }
  ~Reader() {
    if (fd_ >= 0) ::close(fd_);
  }
  void read(uint64_t offset, void* dst, uint64_t size) {
    if (io::detail::pread_full(fd_, path_, dst, size, offset) < size)
      throw IOError(path_ + ": unexpected end of file (truncated while merging?)");
  }

 private:
  std::string path_;
  int fd_ = -1;
};

// ---------------------------------------------------------------- in-place row kernels
//
// One merge step on the rows [r0, r1) of W (a 2-D (O, I·k) fp32/fp64 view), in place, ΔW never materialised:
//   LoRA    W[r0:r1] += c · up[r0:r1] · down                      (one addmm)
//   LoHa    W[r0:r1] += c · (w1a[r0:r1]·w1b) ⊙ (w2a[r0:r1]·w2b)   (two small mm, one addcmul)
//   LoKr    W viewed (a, p, c, q·k): W[u0:u1] += c · W1[u0:u1, None, :, None] · W2[None, :, None, :]
//           c = m·s, or s with DoRA (FORMAT.md §4.3: ΔW at multiplier 1)
//   DoRA, norm per output row:   V = W + ΔW, then V[r] ⊙= g'(r) — the rows of a chunk are whole, one pass
//   DoRA, norm per input column: V = W + ΔW, then V[:, i] ⊙= g'(i) — ‖V[:, i]‖ spans every row, so the
//           caller first runs a pass summing V² per column (set_column_sums), then `scale` applies g'
//           (g' = m·(g − 1) + 1, g = dora_scale / (‖V‖ + ε), dora::factor)
//   (IA)^3  W[r0:r1] ⊙= 1 + m·v  along the rows or the input columns
// Same fp32 math as apply_weight (only the order of the roundings inside one element, and of the sums of
// the norms, differs: a few fp32 ulps); the caller rounds once to the output dtype. Rows come in
// multiples of `block`.
using RowsFn = std::function<void(const torch::Tensor& W_rows, int64_t r0, int64_t r1)>;
struct RowKernel {
  int64_t block = 1;
  RowsFn add;  // the whole step; for a column-norm DoRA step only W ← V = W + ΔW
  // column-norm DoRA only: g' from Σ over all rows of V² per column ((I·k,) fp64), then W ⊙= g' per row range
  std::function<void(const torch::Tensor& column_sums)> set_column_sums;
  RowsFn scale;

  bool needs_columns() const { return static_cast<bool>(set_column_sums); }
  void apply(const torch::Tensor& W, int64_t r0, int64_t r1) const {
    add(W, r0, r1);
    if (scale) scale(W, r0, r1);
  }
};

constexpr int64_t kChunkElements = 1 << 16;  // rows per chunk ≈ 256 KB of fp32: W, P1, P2 stay in cache
// ... but at least this many rows: every chunk's addmm/mm packs the whole (r, cols) right factor again, so a
// chunk of a few rows of a wide layer (1280·9 columns: 5 rows) spent more time packing than multiplying
// (LoHa's compute at SD1.5 scale: 1.4 s with 1 row minimum, 1.05 s with 32; measured 16–128).
constexpr int64_t kMinChunkRows = 32;

bool is_a(const AdapterImpl& a, const std::type_info& t) { return typeid(a) == t; }

// A (rows, cols) view of `buffer`, a thread_local of the caller, grown when too small (at least a chunk).
torch::Tensor scratch(torch::Tensor& buffer, int64_t rows, int64_t cols, const torch::TensorOptions& opts) {
  const int64_t n = rows * cols;
  if (!buffer.defined() || buffer.dtype() != opts.dtype() || buffer.numel() < n)
    buffer = torch::empty({std::max(n, kChunkElements)}, opts);
  return buffer.narrow(0, 0, n).view({rows, cols});
}

// Σ V² per column of the rows V (a chunk's share of the column norms of DoRA's V): summed in V's dtype
// (as the reference's norm does; a sum with dtype=fp64 converts every element first, 4× slower) and
// returned in fp64, in which the chunks' shares accumulate.
torch::Tensor column_sums(const torch::Tensor& V) { return V.square().sum(0).to(torch::kFloat64); }

// W += m·ΔW for an additive low-rank module whose factors are already in W's dtype and device (else
// nullopt: the caller uses apply_weight and gets the reference's rounding).
std::optional<RowKernel> delta_kernel(LowRankAdapter& lr, double m, const torch::TensorOptions& opts,
                                      torch::IntArrayRef shape) {
  auto fits = [&](std::initializer_list<torch::Tensor> ts) {
    for (const auto& t : ts)
      if (t.defined() && (t.dtype() != opts.dtype() || t.device() != opts.device())) return false;
    return true;
  };
  const double c = m * lr.scale();
  // the kernels pass c to torch as a scalar of the compute dtype: one that float32 cannot hold takes the
  // apply_weight path (ΔW overflows to Inf, reported as NaN/Inf) instead of torch refusing it
  if (std::isfinite(c) && opts.dtype() == torch::kFloat32 && std::abs(c) > std::numeric_limits<float>::max())
    return std::nullopt;
  const int64_t O = shape[0], numel = c10::multiply_integers(shape);
  if (is_a(lr, typeid(LoRAImpl))) {
    auto& a = static_cast<LoRAImpl&>(lr);
    if (a.lora_mid.defined() || !fits({a.lora_up, a.lora_down})) return std::nullopt;
    auto up = functional::flat(a.lora_up * a.scalar), down = functional::flat(a.lora_down).contiguous();
    torch::Tensor sparse;  // sparse-bias residual of extracted files: ΔW += dense (unscaled)
    for (const auto& b : a.named_buffers(false))
      if (b.key() == "sparse_bias") sparse = functional::flat(b.value()).to(opts);
    return RowKernel{1, [=](const torch::Tensor& Wr, int64_t r0, int64_t r1) {
                       Wr.addmm_(up.narrow(0, r0, r1 - r0), down, 1.0, c);
                       if (sparse.defined()) Wr.add_(sparse.narrow(0, r0, r1 - r0), m);
                     }};
  }
  if (is_a(lr, typeid(LoHaImpl))) {
    auto& a = static_cast<LoHaImpl&>(lr);
    if (a.hada_t1.defined() || !fits({a.hada_w1_a, a.hada_w1_b, a.hada_w2_a, a.hada_w2_b})) return std::nullopt;
    auto w1a = a.hada_w1_a * a.scalar, w1b = a.hada_w1_b.contiguous(), w2a = a.hada_w2_a.contiguous(),
         w2b = a.hada_w2_b.contiguous();
    return RowKernel{1, [=](const torch::Tensor& Wr, int64_t r0, int64_t r1) {
                       const int64_t n = r1 - r0;
                       // both products in this thread's buffers: no allocation, no fresh pages per chunk
                       thread_local torch::Tensor b1, b2;
                       auto P1 = scratch(b1, n, Wr.size(1), Wr.options()), P2 = scratch(b2, n, Wr.size(1), Wr.options());
                       torch::mm_out(P1, w1a.narrow(0, r0, n), w1b);
                       torch::mm_out(P2, w2a.narrow(0, r0, n), w2b);
                       Wr.addcmul_(P1, P2, c);
                     }};
  }
  if (is_a(lr, typeid(LoKrImpl))) {
    auto& a = static_cast<LoKrImpl&>(lr);
    functional::lokr::Weights w{a.lokr_w1, a.lokr_w1_a, a.lokr_w1_b, a.lokr_w2, a.lokr_w2_a, a.lokr_w2_b, a.lokr_t2};
    if (!fits({w.w1, w.w1a, w.w1b, w.w2, w.w2a, w.w2b, w.t2})) return std::nullopt;
    auto& first = w.w1.defined() ? w.w1 : w.w1a;  // the scalar multiplies W1 (as LoKrImpl does)
    first = first * a.scalar;
    auto W1 = functional::lokr::w1(w), W2 = functional::lokr::w2(lr.layer(), w);
    const int64_t A = W1.size(0), C = W1.size(1), P = W2.size(0);
    if (A * P != O || numel % (O * C) != 0) return std::nullopt;
    const int64_t QK = numel / (O * C);
    auto w2v = W2.reshape({1, P, 1, QK}).contiguous();
    return RowKernel{P, [=](const torch::Tensor& Wr, int64_t r0, int64_t r1) {
                       const int64_t u0 = r0 / P, nu = (r1 - r0) / P;
                       Wr.view({nu, P, C, QK}).addcmul_(W1.narrow(0, u0, nu).reshape({nu, 1, C, 1}), w2v, c);
                     }};
  }
  return std::nullopt;
}

// W ← (W + ΔW) ⊙ g' (FORMAT.md §4.3), the axis from dora_scale's shape.
std::optional<RowKernel> dora_kernel(LowRankAdapter& lr, double m, const torch::TensorOptions& opts,
                                     torch::IntArrayRef shape) {
  auto k = delta_kernel(lr, 1.0, opts, shape);
  if (!k) return std::nullopt;
  const auto ds = lr.dora_scale.detach().to(opts).reshape({-1});
  const RowsFn delta = k->add;
  if (functional::dora::on_out(lr.dora_scale, shape, lr.algo())) {
    const auto ds_rows = ds.view({-1, 1});
    k->add = [=](const torch::Tensor& Wr, int64_t r0, int64_t r1) {
      delta(Wr, r0, r1);
      Wr.mul_(functional::dora::factor(ds_rows.narrow(0, r0, r1 - r0), functional::dora::norm(Wr, true), m));
    };
    return k;
  }
  const int64_t I = shape[1], K = c10::multiply_integers(shape) / (shape[0] * I);
  const double eps = functional::dora::epsilon(c10::typeMetaToScalarType(opts.dtype()));
  auto g = std::make_shared<torch::Tensor>();  // g' per input column, (1, I, 1), once the sums are known
  k->set_column_sums = [=](const torch::Tensor& sums) {
    auto n = sums.view({I, K}).sum(1).sqrt().to(opts.dtype()) + eps;  // ‖V[:, i, …]‖ + ε
    *g = functional::dora::factor(ds, n, m).view({1, I, 1});
  };
  k->scale = [=](const torch::Tensor& Wr, int64_t, int64_t) { Wr.view({Wr.size(0), I, K}).mul_(*g); };
  return k;
}

// W ⊙= 1 + m·v along the output rows or the input columns (FORMAT.md §5.6); the same fp32 ops as
// functional::ia3::apply_weight.
RowKernel ia3_kernel(const IA3Impl& a, double m, const torch::TensorOptions& opts, torch::IntArrayRef shape) {
  const auto f = a.weight.detach().to(opts).reshape({-1}) * m + 1;
  if (!a.on_input()) {
    const auto rows = f.view({-1, 1});
    return RowKernel{1, [=](const torch::Tensor& Wr, int64_t r0, int64_t r1) { Wr.mul_(rows.narrow(0, r0, r1 - r0)); }};
  }
  const int64_t I = shape[1], K = c10::multiply_integers(shape) / (shape[0] * I);
  const auto cols = f.view({1, I, 1});
  return RowKernel{1, [=](const torch::Tensor& Wr, int64_t, int64_t) { Wr.view({Wr.size(0), I, K}).mul_(cols); }};
}

// The kernel of one weight step in eval mode: LoRA / LoHa / LoKr (with or without DoRA) or (IA)^3; nullopt
// for anything else (the caller uses apply_weight).
std::optional<RowKernel> row_kernel(AdapterImpl& adapter, double m, const torch::TensorOptions& opts,
                                    torch::IntArrayRef shape) {
  if (adapter.is_training() || shape.size() < 2) return std::nullopt;
  if (is_a(adapter, typeid(IA3Impl))) return ia3_kernel(static_cast<IA3Impl&>(adapter), m, opts, shape);
  auto* lr = dynamic_cast<LowRankAdapter*>(&adapter);
  if (!lr) return std::nullopt;
  return lr->dora_scale.defined() ? dora_kernel(*lr, m, opts, shape) : delta_kernel(*lr, m, opts, shape);
}

// W ← apply_weight(W, m) (or apply_bias) in place on the whole tensor.
void apply_whole(torch::Tensor& W, AdapterImpl& adapter, double m, bool bias) {
  if (bias) {
    W.copy_(adapter.apply_bias(W, m));
    return;
  }
  if (auto k = row_kernel(adapter, m, W.options(), W.sizes())) {
    auto W2 = W.view({W.size(0), -1});
    k->add(W2, 0, W.size(0));
    if (k->needs_columns()) k->set_column_sums(column_sums(W2));
    if (k->scale) k->scale(W2, 0, W.size(0));
    return;
  }
  // additive low-rank modules the kernels do not cover (Tucker, DyLoRA, factors in another dtype):
  // W += m·ΔW in place, ΔW as the module builds it
  auto* lr = dynamic_cast<LowRankAdapter*>(&adapter);
  const bool additive = lr && !lr->is_training() && !lr->dora_scale.defined() &&
                        (is_a(adapter, typeid(LoRAImpl)) || is_a(adapter, typeid(LoHaImpl)) ||
                         is_a(adapter, typeid(LoKrImpl)) || is_a(adapter, typeid(DyLoRAImpl)));
  if (additive) {
    auto dw = lr->diff_weight();
    if (functional::compute_dtype(dw) == W.scalar_type()) {
      W.add_(dw.reshape(W.sizes()).to(W.device(), W.scalar_type()), m);
      return;
    }
  }
  W.copy_(adapter.apply_weight(W, m));
}

bool all_finite(const torch::Tensor& t) {
  // a finite sum means every element is finite (NaN/Inf propagate); only if it is not, look closer
  // (the sum itself may overflow)
  if (std::isfinite(t.sum().item<double>())) return true;
  return torch::isfinite(t).all().item<bool>();
}



// This thread's intra-op threads. With OpenMP that is the thread's own ICV: at::set_num_threads (torch 1.13)
// would also rebuild torch's pthreadpool (QNNPACK's), whose fresh threads spin for a while.
void set_intra_op_threads(int n) {
#if AT_PARALLEL_OPENMP
  static const auto omp = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  if (omp) {
    at::get_num_threads();  // torch's per-thread initialisation first: it would reset the ICV later
    omp(n);
    return;
  }
#endif
  at::set_num_threads(n);
}

// Persistent chunk workers (created on first use, for the life of the process), each running torch
// single-threaded and taking chunks from a counter: no OpenMP barrier per tensor, so a worker the OS
// preempts (2 cores shared with the reader, the writer and other processes) delays the tensor by one
// chunk, not by a time slice of spinning. Persistent because a fresh thread pays torch's per-thread
// initialisation on its first op (in torch 1.13 a rebuild of its pthreadpool, whose new threads spin):
// with threads per tensor that was a third of a merge's CPU time.
class ChunkWorkers {
 public:
  static ChunkWorkers& instance() {
    static ChunkWorkers pool;
    return pool;
  }
  // fn(chunk, worker) for every chunk in [0, chunks) on `workers` threads, the caller being worker 0.
  // The first exception stops the others and is rethrown.
  void run(int64_t chunks, int workers, const std::function<void(int64_t, int)>& fn) {
    std::lock_guard<std::mutex> one_job(run_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(threads_.size()) < workers - 1) {
        const int id = static_cast<int>(threads_.size()) + 1;
        threads_.emplace_back([this, id] { loop(id); });
      }
      fn_ = &fn;
      chunks_ = chunks;
      next_ = 0;
      workers_ = workers;
      active_ = workers - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    const int threads = at::get_num_threads();
    set_intra_op_threads(1);
    work(0);
    set_intra_op_threads(threads);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return active_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }
  ~ChunkWorkers() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  void loop(int id) {
    set_intra_op_threads(1);
    c10::GradMode::set_enabled(false);
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (id >= workers_) continue;
      }
      work(id);
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_.notify_all();
    }
  }
  void work(int id) {
    try {
      torch::NoGradGuard no_grad;
      for (int64_t c; (c = next_++) < chunks_;) (*fn_)(c, id);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      next_ = chunks_;
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t chunks_ = 0;
  std::atomic<int64_t> next_{0};
  int workers_ = 0, active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

// A step's rows of x: [row_begin, row_end), or every row; ShapeError when the range does not lie in x.
torch::Tensor step_rows(const torch::Tensor& W, const MergeStep& s) {
  if (!s.ranged()) return W;
  if (W.dim() < 1 || s.row_begin < 0 || s.row_begin >= s.row_end || s.row_end > W.size(0))
    throw ShapeError("merge: rows [" + std::to_string(s.row_begin) + ", " + std::to_string(s.row_end) +
                     ") of a tensor of shape " + functional::shape_str(W.sizes()));
  return W.narrow(0, s.row_begin, s.row_end - s.row_begin);
}

}  // namespace

bool merge_tensor(const torch::Tensor& x, const torch::Tensor& out, const std::vector<MergeStep>& steps,
                  torch::Device device) {
  const auto compute = x.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  const bool cpu = device.is_cpu() && x.device().is_cpu() && out.device().is_cpu();
  // Steps on a row block (fused q/k/v: small tensors) take the generic path below.
  bool ranged = false;
  for (const auto& s : steps) {
    step_rows(x, s);  // checks the range
    ranged = ranged || s.ranged();
  }
  // Row-chunked path (CPU, ≥ 2-D, every step a row kernel): each chunk of rows is converted to fp32,
  // goes through every step, is checked and rounded into `out` while it is in cache; chunks run in parallel.
  std::vector<RowKernel> kernels;
  if (cpu && !ranged && x.dim() >= 2 && x.numel() > 0 && out.is_contiguous() && x.is_contiguous()) {
    for (const auto& s : steps) {
      if (s.bias) break;
      auto k = row_kernel(*s.adapter, s.m, x.options().dtype(compute), x.sizes());
      if (!k) break;
      kernels.push_back(std::move(*k));
    }
    if (kernels.size() != steps.size()) kernels.clear();
  }
  if (!kernels.empty()) {
    const int64_t O = x.size(0), cols = x.numel() / O;
    int64_t block = 1;
    for (const auto& k : kernels) block = std::lcm(block, k.block);
    if (O % block == 0) {
      const int64_t rows =
          std::max<int64_t>(std::max<int64_t>(1, kMinChunkRows / block), kChunkElements / std::max<int64_t>(cols, 1) / block) * block;
      const int64_t chunks = (O + rows - 1) / rows;
      const int workers = static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), chunks));
      auto x2 = x.view({O, cols}), o2 = out.view({O, cols});
      std::atomic<bool> finite{true};
      // One pass per column-norm DoRA step (from x again, through the steps before it: Σ V² per column over
      // all rows, which that step needs before it can scale), then the pass that writes `out`. Only the
      // last pass writes, so `out` may be `x`.
      for (size_t upto = 0;; ++upto) {
        while (upto < kernels.size() && !kernels[upto].needs_columns()) ++upto;
        const bool last = upto == kernels.size();
        std::vector<torch::Tensor> sums(static_cast<size_t>(workers));  // per worker: no lock, no race
        ChunkWorkers::instance().run(chunks, workers, [&](int64_t c, int worker) {
          const int64_t r0 = c * rows, r1 = std::min(O, r0 + rows);
          // the fp32 rows in a buffer of this (persistent) worker: no allocation, no fresh pages per chunk
          thread_local torch::Tensor buffer;
          auto W = scratch(buffer, r1 - r0, cols, x.options().dtype(compute));
          functional::convert_into(W, x2.narrow(0, r0, r1 - r0));
          for (size_t i = 0; i < upto; ++i) kernels[i].apply(W, r0, r1);
          if (!last) {
            kernels[upto].add(W, r0, r1);
            auto& acc = sums[static_cast<size_t>(worker)];
            acc = acc.defined() ? acc.add_(column_sums(W)) : column_sums(W);
            return;
          }
          if (!all_finite(W)) finite = false;
          functional::convert_into(o2.narrow(0, r0, r1 - r0), W);
        });
        if (last) return finite;
        torch::Tensor total;
        for (const auto& s : sums)
          if (s.defined()) total = total.defined() ? total.add_(s) : s;
        kernels[upto].set_column_sums(total);
      }
    }
  }
  auto W = x.to(device, compute, /*non_blocking=*/false, /*copy=*/true);
  for (const auto& s : steps) {
    auto rows = step_rows(W, s);  // a view: the step writes into W
    apply_whole(rows, *s.adapter, s.m, s.bias);
  }
  const bool finite = all_finite(W);
  out.copy_(W);
  return finite;
}

namespace {

std::string dtype_label(const std::optional<torch::ScalarType>& dtype) {
  return dtype ? io::dtype_name(io::from_torch(*dtype)) : "keep";
}

}  // namespace

std::string merge_record(const std::vector<MergeInput>& adapters, const std::optional<torch::ScalarType>& dtype,
                         const std::string& previous) {
  nlohmann::json j;
  j["tool"] = std::string("lycoris-cpp ") + LYCORIS_VERSION;
  j["adapters"] = nlohmann::json::array();
  for (const auto& a : adapters)
    j["adapters"].push_back({{"file", std::filesystem::path(a.path).filename().string()}, {"weight", a.weight}});
  j["dtype"] = dtype_label(dtype);
  if (!previous.empty()) {
    auto prev = nlohmann::json::parse(previous, nullptr, false);
    j["previous"] = prev.is_discarded() ? nlohmann::json(previous) : prev;
  }
  return j.dump();
}

MergeReport merge(const std::string& base_path, const std::string& output, const MergeOptions& options) {
  const auto t0 = Clock::now();
  MergeReport report;
  auto warn = [&](const std::string& w) {
    report.warnings.push_back(w);
    if (options.on_warning) options.on_warning(w);
  };
  if (options.threads > 0) at::set_num_threads(options.threads);
  SingleThreadedBlas blas;
  // This thread loads the adapters (small tensors) and writes: torch single-threaded here, so that no
  // OpenMP team spins between its tiny parallel regions (≈ 6% of a merge's CPU time, measured); the
  // compute thread and the chunk workers set their own. The caller's setting comes back on return.
  struct OneIntraOpThread {
    int previous = at::get_num_threads();
    OneIntraOpThread() { set_intra_op_threads(1); }
    ~OneIntraOpThread() { set_intra_op_threads(previous); }
  } one_thread;

  auto base = io::SafetensorsFile::open(base_path);
  const auto& header = base.header();
  std::map<std::string, std::vector<int64_t>> shapes;
  std::vector<std::string> keys;
  for (const auto& t : header.tensors) {
    shapes[t.name] = t.shape;
    keys.push_back(t.name);
  }
  naming::Resolver names(keys, options.base_format);

  // ---- output declaration: same keys and order, floats in the requested dtype
  std::vector<io::TensorDecl> decls;
  std::vector<io::DType> out_dtypes;
  uint64_t bytes_total = 0;
  for (const auto& t : header.tensors) {
    io::DType d = t.dtype;
    if (options.dtype && is_float(t.dtype)) d = io::from_torch(*options.dtype);
    decls.push_back({t.name, d, t.shape});
    out_dtypes.push_back(d);
    bytes_total += t.nbytes();
  }
  auto metadata = header.metadata;
  {
    auto it = metadata.find("lycoris_merge");
    metadata["lycoris_merge"] = merge_record(options.adapters, options.dtype, it == metadata.end() ? "" : it->second);
  }
  // Same dtypes, so the same byte layout: the zero-copy path (io/rewriter.hpp), started now so that the
  // first tensors are read while the adapters load.
  bool same_layout = io::SafetensorsRewriter::supported(header) && !std::getenv("LYCORIS_MERGE_NO_REWRITER");
  for (size_t i = 0; i < decls.size(); ++i) same_layout = same_layout && out_dtypes[i] == header.tensors[i].dtype;
  std::unique_ptr<io::SafetensorsRewriter> rewriter;
  if (same_layout) {
    io::SafetensorsRewriter::Options ro;
    ro.window_bytes = options.max_bytes_in_flight;
    try {
      rewriter = std::make_unique<io::SafetensorsRewriter>(base_path, header, output, metadata, ro);
    } catch (const IOError&) {
      // no window (no memfd, or a file-size limit below it): the buffer-pool path below; a problem with
      // the files themselves comes back from there with its own message
    }
  }

  // ---- load every adapter and plan the steps of every base tensor (adapters in order)
  std::vector<LoadedAdapter> adapters;
  std::unordered_map<std::string, std::vector<Step>> plan;
  AdapterLoadOptions load_options;
  load_options.allow_unmatched = options.allow_unmatched;
  load_options.device = options.device;
  for (size_t i = 0; i < options.adapters.size(); ++i) {
    const auto& in = options.adapters[i];
    if (!std::isfinite(in.weight)) throw OptionError(in.path + ": weight must be finite");
    adapters.push_back(load_adapter_for_base(io::SafetensorsFile::open(in.path), names, shapes, load_options));
    for (const auto& w : adapters.back().warnings) warn(w);
    report.modules_applied.push_back(adapters.back().modules.size());
  }
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < adapters.size(); ++i)
      for (const auto& m : adapters[i].modules) {
        const double w = options.adapters[i].weight;
        // A module on a row block of a fused tensor (OpenCLIP's q/k/v in attn.in_proj_weight, naming.hpp:
        // rows [part·R/parts, (part+1)·R/parts)) merges into those rows of the weight and of the bias — the
        // weight it would see as a separate q/k/v layer (as ComfyUI and sd-webui apply it).
        int64_t r0 = 0, r1 = -1;
        if (m.target.layer.fused()) {
          const auto& layer = m.target.layer;
          const int64_t R = shapes.at(layer.weight_key).at(0);  // divisible by parts: checked by the loader
          r0 = layer.part * (R / layer.parts);
          r1 = r0 + R / layer.parts;
          if (!layer.bias_key.empty() && shapes.at(layer.bias_key) != std::vector<int64_t>{R}) {
            const std::string why = adapters[i].path + ": " + m.name + ": fused bias " + layer.bias_key + " has shape " +
                                    functional::shape_str(shapes.at(layer.bias_key)) + ", expected [" +
                                    std::to_string(R) + "] (the rows of " + layer.weight_key + ")";
            if (!options.allow_unmatched) throw ShapeError(why);
            warn("skipped " + why);
            --report.modules_applied[i];
            continue;
          }
        }
        plan[m.target.layer.weight_key].push_back({&m, i, {m.adapter.get(), w, false, r0, r1}});
        if (!m.target.layer.bias_key.empty()) {
          plan[m.target.layer.bias_key].push_back({&m, i, {m.adapter.get(), w, true, r0, r1}});
        } else {
          // an algorithm with a bias delta (Full diff_b, Norm b_norm) on a layer without bias: the checkpoint
          // has no key to receive it, and adding one would break loading the model strictly.
          auto created = m.adapter->apply_bias(torch::Tensor(), 1.0);
          if (created.defined())
            warn(adapters[i].path + ": " + m.name + ": bias delta dropped (base has no " +
                 (m.target.layer.path.empty() ? std::string("bias") : m.target.layer.path + ".bias") + ")");
        }
      }
  }
  for (size_t i = 0; i < decls.size(); ++i)
    if (plan.count(decls[i].name) && !has_torch_dtype(out_dtypes[i]))
      throw OptionError(decls[i].name + ": cannot write a merged tensor as " + io::dtype_name(out_dtypes[i]) +
                        " (choose an output dtype)");
  report.load_seconds = seconds_since(t0);

  // The compute stage for base tensor `index`, read as `data`: the tensor to write — `data` itself when
  // nothing changes it or when it was merged in place (same dtype), else a new tensor.
  auto compute_tensor = [&](size_t index, const torch::Tensor& data) -> torch::Tensor {
    const auto& t = header.tensors[index];
    const io::DType out_dtype = out_dtypes[index];
    const auto c0 = Clock::now();
    torch::Tensor result = data;
    auto steps = plan.find(t.name);
    if (steps != plan.end()) {
      // F8 bytes are decoded (exactly) by the file reader; everything else is the tensor we read
      torch::Tensor x = has_torch_dtype(t.dtype) ? data : base.tensor(t.name);
      // same dtype: the result overwrites the read buffer (chunk by chunk), nothing else is allocated
      result = out_dtype == t.dtype ? x : torch::empty(t.shape, torch::TensorOptions().dtype(io::to_torch(out_dtype)));
      std::vector<MergeStep> ms;
      for (const auto& s : steps->second) ms.push_back(s.step);
      if (!merge_tensor(x, result, ms, options.device)) {
        // name the culprit: the base tensor itself, or the first step that produced NaN/Inf
        const auto compute = t.dtype == io::DType::F64 ? torch::kFloat64 : torch::kFloat32;
        auto V = (has_torch_dtype(t.dtype) ? base.tensor(t.name) : x).to(options.device, compute, false, true);
        std::string who = "the base tensor itself";
        if (torch::isfinite(V).all().item<bool>())
          for (const auto& s : steps->second) {
            const auto& st = s.step;
            auto rows = step_rows(V, st);  // the step's rows (a fused tensor's block) or V itself
            rows.copy_(st.bias ? st.adapter->apply_bias(rows, st.m) : st.adapter->apply_weight(rows, st.m));
            if (!torch::isfinite(V).all().item<bool>()) {
              who = "module " + s.module->name + " (" + s.module->algo + ") of " + adapters[s.adapter].path;
              break;
            }
          }
        throw Error(t.name + ": merged tensor has NaN/Inf values, from " + who);
      }
    } else if (out_dtype != t.dtype) {
      torch::Tensor x = has_torch_dtype(t.dtype) ? data : base.tensor(t.name);
      result = x.to(io::to_torch(out_dtype)).contiguous();
    }
    report.compute_seconds += seconds_since(c0);
    static const bool trace = std::getenv("LYCORIS_MERGE_TRACE") != nullptr;
    if (trace)
      std::fprintf(stderr, "%8.1f ms %s %s\n", seconds_since(c0) * 1e3, t.name.c_str(), c10::str(t.shape).c_str());
    return result;
  };
  auto progress = [&](size_t index, uint64_t bytes_done) {
    if (!options.on_progress) return;
    MergeProgress p;
    p.index = index + 1;
    p.total = header.tensors.size();
    p.key = &header.tensors[index].name;
    p.modified = plan.count(header.tensors[index].name) > 0;
    p.bytes_done = bytes_done;
    p.bytes_total = bytes_total;
    p.seconds = seconds_since(t0);
    options.on_progress(p);
  };

  if (rewriter) {
    // The zero-copy path: every tensor is merged in place in the rewriter's window, in file order.
    std::exception_ptr error;
    std::thread compute_thread([&] {
      try {
        if (options.threads > 0) at::set_num_threads(options.threads);
        torch::NoGradGuard no_grad;
        uint64_t bytes_done = 0;
        for (size_t i = 0; i < header.tensors.size(); ++i) {
          const auto& t = header.tensors[i];
          uint8_t* bytes = rewriter->acquire(i);
          if (plan.count(t.name))
            compute_tensor(i, torch::from_blob(bytes, t.shape, torch::TensorOptions().dtype(io::to_torch(t.dtype))));
          rewriter->release(i);
          bytes_done += t.nbytes();
          ++report.tensors;
          if (plan.count(t.name)) ++report.modified;
          progress(i, bytes_done);
        }
      } catch (...) {
        error = std::current_exception();
      }
    });
    compute_thread.join();
    if (error) std::rethrow_exception(error);
    const auto f0 = Clock::now();
    rewriter->commit();
    report.read_seconds = rewriter->read_seconds();
    report.write_seconds = rewriter->write_seconds() + seconds_since(f0);
    report.bytes_read = report.bytes_written = bytes_total;
    report.total_seconds = seconds_since(t0);
    return report;
  }
  io::SafetensorsWriter writer(output, decls, metadata);

  // ---- the pipeline: read slots (at least three, so that reading, computing and writing overlap)
  uint64_t max_bytes = 0;
  for (const auto& t : header.tensors) max_bytes = std::max<uint64_t>(max_bytes, t.nbytes());
  const size_t slots = static_cast<size_t>(
      std::clamp<uint64_t>(options.max_bytes_in_flight / std::max<uint64_t>(max_bytes, 1), 3, 64));
  SlotPool pool(slots, max_bytes);
  BoundedQueue<Item> read_q(slots), done_q(slots);
  std::mutex error_mu;
  std::exception_ptr error;
  auto fail = [&](std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = e;
    }
    read_q.abort();
    done_q.abort();
    pool.abort();
  };
  Reader reader(base_path);

  std::thread read_thread([&] {
    try {
      for (size_t i = 0; i < header.tensors.size(); ++i) {
        const auto& t = header.tensors[i];
        Item item;
        item.index = i;
        item.slot = pool.acquire();
        if (item.slot < 0) return;
        const auto r0 = Clock::now();
        if (has_torch_dtype(t.dtype))
          item.data = torch::from_blob(pool.data(item.slot), t.shape, torch::TensorOptions().dtype(io::to_torch(t.dtype)));
        else
          item.data = torch::from_blob(pool.data(item.slot), {static_cast<int64_t>(t.nbytes())}, torch::kUInt8);
        if (t.nbytes() > 0) reader.read(header.data_start + t.begin, pool.data(item.slot), t.nbytes());
        report.read_seconds += seconds_since(r0);
        if (!read_q.push(std::move(item))) return;
      }
      read_q.close();
    } catch (...) {
      fail(std::current_exception());
    }
  });

  std::thread compute_thread([&] {
    try {
      // intra-op threads are a per-thread setting with OpenMP: set them for this thread
      if (options.threads > 0) at::set_num_threads(options.threads);
      torch::NoGradGuard no_grad;
      Item item;
      while (read_q.pop(item)) {
        auto out = compute_tensor(item.index, item.data);
        if (!out.is_same(item.data)) item.out = out;
        if (!done_q.push(std::move(item))) return;
      }
      done_q.close();
    } catch (...) {
      fail(std::current_exception());
    }
  });

  try {
    Item item;
    uint64_t bytes_done = 0;
    while (done_q.pop(item)) {
      const auto& t = header.tensors[item.index];
      const bool modified = plan.count(t.name) > 0;
      const auto w0 = Clock::now();
      if (item.out.defined()) {
        writer.write(t.name, item.out);
        report.bytes_written += static_cast<uint64_t>(item.out.nbytes());
      } else {
        writer.write_bytes(t.name, pool.data(item.slot), t.nbytes());
        report.bytes_written += t.nbytes();
      }
      pool.release(item.slot);
      item = Item();  // free before asking for more
      report.write_seconds += seconds_since(w0);
      bytes_done += t.nbytes();
      ++report.tensors;
      if (modified) ++report.modified;
      progress(item.index, bytes_done);
    }
  } catch (...) {
    fail(std::current_exception());
  }
  read_thread.join();
  compute_thread.join();
  if (error) std::rethrow_exception(error);
  if (report.tensors != header.tensors.size())
    throw Error(output + ": internal error: wrote " + std::to_string(report.tensors) + " of " +
                std::to_string(header.tensors.size()) + " tensors");
  const auto f0 = Clock::now();
  writer.commit();
  report.write_seconds += seconds_since(f0);
  report.bytes_read = bytes_total;
  report.total_seconds = seconds_since(t0);
  return report;
}

}  // namespace lycoris::tools
