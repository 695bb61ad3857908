// `lycoris merge`: streaming, three-stage pipeline (see include/lycoris/tools/merge.hpp).
#include "lycoris/tools/merge.hpp"

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

#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"
#include "lycoris/version.hpp"

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

// Bytes in flight between the reader and the writer: the reader waits while the budget is used up
// (a single tensor larger than the budget is still admitted when nothing else is in flight).
class ByteBudget {
 public:
  explicit ByteBudget(uint64_t limit) : limit_(limit) {}
  bool acquire(uint64_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return aborted_ || used_ == 0 || used_ + n <= limit_; });
    if (aborted_) return false;
    used_ += n;
    return true;
  }
  void release(uint64_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    used_ -= std::min(used_, n);
    cv_.notify_all();
  }
  void abort() {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  uint64_t limit_, used_ = 0;
  bool aborted_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
};

// One adapter module applied to one base tensor.
struct Step {
  const AdapterModule* module;
  size_t adapter;  // index in options.adapters
  double weight;
  bool bias;       // apply_bias instead of apply_weight
};

struct Item {
  size_t index = 0;
  torch::Tensor data;  // the base tensor as read (raw bytes as uint8 for F8 dtypes)
  torch::Tensor out;   // converted / merged tensor to write; undefined → write `data`'s bytes as they are
  uint64_t charge = 0;
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
    auto* p = static_cast<uint8_t*>(dst);
    while (size > 0) {
      ssize_t n = ::pread(fd_, p, size, static_cast<off_t>(offset));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw IOError(path_ + ": read failed: " + std::strerror(errno));
      if (n == 0) throw IOError(path_ + ": unexpected end of file (truncated while merging?)");
      p += n;
      offset += static_cast<uint64_t>(n);
      size -= static_cast<uint64_t>(n);
    }
  }

 private:
  std::string path_;
  int fd_ = -1;
};

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

  auto base = io::SafetensorsFile::open(base_path);
  const auto& header = base.header();
  std::map<std::string, std::vector<int64_t>> shapes;
  std::vector<std::string> keys;
  for (const auto& t : header.tensors) {
    shapes[t.name] = t.shape;
    keys.push_back(t.name);
  }
  naming::Resolver names(keys, options.base_format);

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
        if (m.target.layer.fused()) {  // q/k/v rows of OpenCLIP's in_proj_weight (naming.hpp): not merged yet
          const std::string why = adapters[i].path + ": " + m.name + " maps to rows part " +
                                  std::to_string(m.target.layer.part) + "/" + std::to_string(m.target.layer.parts) +
                                  " of the fused tensor " + m.target.layer.weight_key +
                                  ": merging into fused OpenCLIP q/k/v projections is not supported";
          if (!options.allow_unmatched) throw OptionError(why + " (--allow-unmatched skips such modules)");
          warn("skipped " + why);
          --report.modules_applied[i];
          continue;
        }
        plan[m.target.layer.weight_key].push_back({&m, i, w, false});
        if (!m.target.layer.bias_key.empty()) {
          plan[m.target.layer.bias_key].push_back({&m, i, w, true});
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
  report.load_seconds = seconds_since(t0);

  // ---- output declaration: same keys and order, floats in the requested dtype
  std::vector<io::TensorDecl> decls;
  std::vector<io::DType> out_dtypes;
  uint64_t bytes_total = 0;
  for (const auto& t : header.tensors) {
    io::DType d = t.dtype;
    if (options.dtype && is_float(t.dtype)) d = io::from_torch(*options.dtype);
    if (plan.count(t.name) && !has_torch_dtype(d))
      throw OptionError(t.name + ": cannot write a merged tensor as " + io::dtype_name(d) +
                        " (choose an output dtype)");
    decls.push_back({t.name, d, t.shape});
    out_dtypes.push_back(d);
    bytes_total += t.nbytes();
  }
  auto metadata = header.metadata;
  {
    auto it = metadata.find("lycoris_merge");
    metadata["lycoris_merge"] = merge_record(options.adapters, options.dtype, it == metadata.end() ? "" : it->second);
  }
  io::SafetensorsWriter writer(output, decls, metadata);

  // ---- the pipeline
  BoundedQueue<Item> read_q(2), done_q(2);
  ByteBudget budget(options.max_bytes_in_flight);
  std::mutex error_mu;
  std::exception_ptr error;
  auto fail = [&](std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = e;
    }
    read_q.abort();
    done_q.abort();
    budget.abort();
  };
  Reader reader(base_path);

  std::thread read_thread([&] {
    try {
      for (size_t i = 0; i < header.tensors.size(); ++i) {
        const auto& t = header.tensors[i];
        Item item;
        item.index = i;
        item.charge = t.nbytes();
        if (!budget.acquire(item.charge)) return;
        if (has_torch_dtype(t.dtype))
          item.data = torch::empty(t.shape, torch::TensorOptions().dtype(io::to_torch(t.dtype)));
        else
          item.data = torch::empty({static_cast<int64_t>(t.nbytes())}, torch::kUInt8);
        const auto r0 = Clock::now();
        if (t.nbytes() > 0) reader.read(header.data_start + t.begin, item.data.data_ptr(), t.nbytes());
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
      torch::NoGradGuard no_grad;
      Item item;
      while (read_q.pop(item)) {
        const auto& t = header.tensors[item.index];
        const io::DType out_dtype = out_dtypes[item.index];
        const auto c0 = Clock::now();
        auto steps = plan.find(t.name);
        if (steps != plan.end()) {
          // F8 bytes are decoded (exactly) by the file reader; everything else is the tensor we read
          torch::Tensor x = has_torch_dtype(t.dtype) ? item.data : base.tensor(t.name);
          const auto compute = x.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
          auto W = x.to(options.device, compute);
          for (const auto& s : steps->second)
            W = s.bias ? s.module->adapter->apply_bias(W, s.weight) : s.module->adapter->apply_weight(W, s.weight);
          if (!torch::isfinite(W).all().item<bool>()) {
            // name the culprit: the base tensor itself, or the first step that produced NaN/Inf
            auto V = x.to(options.device, compute);
            std::string who = "the base tensor itself";
            if (torch::isfinite(V).all().item<bool>())
              for (const auto& s : steps->second) {
                V = s.bias ? s.module->adapter->apply_bias(V, s.weight) : s.module->adapter->apply_weight(V, s.weight);
                if (!torch::isfinite(V).all().item<bool>()) {
                  who = "module " + s.module->name + " (" + s.module->algo + ") of " + adapters[s.adapter].path;
                  break;
                }
              }
            throw Error(t.name + ": merged tensor has NaN/Inf values, from " + who);
          }
          item.out = W.to(torch::kCPU, io::to_torch(out_dtype)).contiguous();
          item.data = torch::Tensor();
        } else if (out_dtype != t.dtype) {
          torch::Tensor x = has_torch_dtype(t.dtype) ? item.data : base.tensor(t.name);
          item.out = x.to(io::to_torch(out_dtype)).contiguous();
          item.data = torch::Tensor();
        }
        report.compute_seconds += seconds_since(c0);
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
        writer.write_bytes(t.name, item.data.data_ptr(), t.nbytes());
        report.bytes_written += t.nbytes();
      }
      item = Item();  // free before asking for more
      report.write_seconds += seconds_since(w0);
      budget.release(t.nbytes());
      bytes_done += t.nbytes();
      ++report.tensors;
      if (modified) ++report.modified;
      if (options.on_progress) {
        MergeProgress p;
        p.index = report.tensors;
        p.total = header.tensors.size();
        p.key = &t.name;
        p.modified = modified;
        p.bytes_done = bytes_done;
        p.bytes_total = bytes_total;
        options.on_progress(p);
      }
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
