// `lycoris merge`: the plan (plan.hpp), the per-tensor callback (tensor_merger.hpp) and the driver below,
// which feeds it from one of two I/O backends (see include/lycoris/tools/merge.hpp).
#include "lycoris/tools/merge.hpp"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <thread>

#include "exec/bounded_queue.hpp"
#include "exec/stages.hpp"
#include "exec/stopwatch.hpp"
#include "exec/threads.hpp"
#include "io/read_pool.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/output_path.hpp"
#include "lycoris/io/rewriter.hpp"
#include "lycoris/io/safetensors.hpp"
#include "tools/merge/plan.hpp"
#include "tools/merge/tensor_merger.hpp"

namespace lycoris::tools {

namespace {

// What the merge writes: the base's keys and order, floating-point tensors in the requested dtype.
struct OutputLayout {
  std::vector<io::TensorDecl> decls;
  std::vector<io::DType> dtypes;
  uint64_t bytes_total = 0;  // base data bytes
  bool same_dtypes = true;   // every tensor keeps its dtype: the same byte layout
};

OutputLayout output_layout(const io::Header& header, const std::optional<torch::ScalarType>& dtype) {
  OutputLayout out;
  for (const auto& t : header.tensors) {
    io::DType d = t.dtype;
    if (dtype && io::is_floating(t.dtype)) d = io::from_torch(*dtype);
    out.decls.push_back({t.name, d, t.shape});
    out.dtypes.push_back(d);
    out.bytes_total += t.nbytes();
    out.same_dtypes = out.same_dtypes && d == t.dtype;
  }
  return out;
}

// The zero-copy path (io/rewriter.hpp) when the output keeps the input's byte layout, started at once so
// that the first tensors are read while the adapters load; null when it is not available.
std::unique_ptr<io::SafetensorsRewriter> start_rewriter(const std::string& base_path, const io::Header& header,
                                                        const std::string& output,
                                                        const std::map<std::string, std::string>& metadata,
                                                        bool same_dtypes, const MergeOptions& options) {
  if (!same_dtypes || !io::SafetensorsRewriter::supported(header) || std::getenv("LYCORIS_MERGE_NO_REWRITER"))
    return nullptr;
  io::SafetensorsRewriter::Options ro;
  ro.window_bytes = options.max_bytes_in_flight;
  try {
    return std::make_unique<io::SafetensorsRewriter>(base_path, header, output, metadata, ro);
  } catch (const IOError&) {
    // no window (no memfd, or a file-size limit below it): the buffer-pool path; a problem with the files
    // themselves comes back from there with its own message
    return nullptr;
  }
}

// The compute stage's thread: intra-op threads are a per-thread setting with OpenMP, so they are set here.
struct ComputeThread {
  explicit ComputeThread(int threads) {
    if (threads > 0) at::set_num_threads(threads);
  }
  torch::NoGradGuard no_grad;
};

// A base tensor on its way through the buffer-pool pipeline.
struct Item {
  size_t index = 0;
  int slot = -1;       // read buffer of the pool holding `data`
  torch::Tensor data;  // the base tensor as read (raw bytes as uint8 for F8 dtypes), a view of the slot
  torch::Tensor out;   // merged / converted tensor to write when it is not `data` itself; undefined → `data`
};

// Runs one backend over every base tensor in file order, with the per-tensor callback in between, and
// reports progress per tensor written.
class MergeDriver {
 public:
  MergeDriver(const io::Header& header, const MergePlan& plan, TensorMerger& compute, const MergeOptions& options,
              uint64_t bytes_total, MergeReport& report, const exec::Stopwatch& since_start)
      : header_(header), plan_(plan), compute_(compute), options_(options), bytes_total_(bytes_total),
        report_(report), since_start_(since_start) {}

  // Every touched tensor merged in place in the rewriter's window.
  void in_place(io::SafetensorsRewriter& rewriter);
  // pread into a pool of slots → compute → SafetensorsWriter, each stage on its own thread (at least three
  // slots, so that reading, computing and writing overlap).
  void buffered(const std::string& base_path, const std::string& output, const std::vector<io::TensorDecl>& decls,
                const std::map<std::string, std::string>& metadata);

 private:
  void read_stage(io::PreadReader& reader, io::SlotPool& pool, exec::BoundedQueue<Item>& read_q);
  void compute_stage(exec::BoundedQueue<Item>& read_q, exec::BoundedQueue<Item>& done_q);
  void write_stage(io::SafetensorsWriter& writer, io::SlotPool& pool, exec::BoundedQueue<Item>& done_q);
  // Tensor `index` is written (bytes_done base bytes so far): counted and reported.
  void written(size_t index, uint64_t bytes_done);

  const io::Header& header_;
  const MergePlan& plan_;
  TensorMerger& compute_;
  const MergeOptions& options_;
  uint64_t bytes_total_;
  MergeReport& report_;
  const exec::Stopwatch& since_start_;
};

void MergeDriver::in_place(io::SafetensorsRewriter& rewriter) {
  exec::Stages stages;
  stages.spawn([&] {
    ComputeThread scope(options_.threads);
    uint64_t bytes_done = 0;
    for (size_t i = 0; i < header_.tensors.size(); ++i) {
      const auto& t = header_.tensors[i];
      uint8_t* bytes = rewriter.acquire(i);
      if (plan_.touches(t.name))
        compute_(i, torch::from_blob(bytes, t.shape, torch::TensorOptions().dtype(io::to_torch(t.dtype))));
      rewriter.release(i);
      bytes_done += t.nbytes();
      written(i, bytes_done);
    }
  });
  stages.join();
  const exec::Stopwatch commit;
  rewriter.commit();
  report_.read_seconds = rewriter.read_seconds();
  report_.write_seconds = rewriter.write_seconds() + commit.seconds();
  report_.bytes_read = report_.bytes_written = bytes_total_;
}

void MergeDriver::buffered(const std::string& base_path, const std::string& output,
                           const std::vector<io::TensorDecl>& decls, const std::map<std::string, std::string>& metadata) {
  io::SafetensorsWriter writer(output, decls, metadata);
  uint64_t max_bytes = 0;
  for (const auto& t : header_.tensors) max_bytes = std::max<uint64_t>(max_bytes, t.nbytes());
  const size_t slots = static_cast<size_t>(
      std::clamp<uint64_t>(options_.max_bytes_in_flight / std::max<uint64_t>(max_bytes, 1), 3, 64));
  io::SlotPool pool(slots, max_bytes);
  exec::BoundedQueue<Item> read_q(slots), done_q(slots);
  io::PreadReader reader(base_path);
  exec::Stages stages([&] {
    read_q.abort();
    done_q.abort();
    pool.abort();
  });
  stages.spawn([&] { read_stage(reader, pool, read_q); });
  stages.spawn([&] { compute_stage(read_q, done_q); });
  stages.run([&] { write_stage(writer, pool, done_q); });
  stages.join();
  if (report_.tensors != header_.tensors.size())
    throw Error(output + ": internal error: wrote " + std::to_string(report_.tensors) + " of " +
                std::to_string(header_.tensors.size()) + " tensors");
  const exec::Stopwatch commit;
  writer.commit();
  report_.write_seconds += commit.seconds();
  report_.bytes_read = bytes_total_;
}

void MergeDriver::read_stage(io::PreadReader& reader, io::SlotPool& pool, exec::BoundedQueue<Item>& read_q) {
  for (size_t i = 0; i < header_.tensors.size(); ++i) {
    const auto& t = header_.tensors[i];
    Item item;
    item.index = i;
    item.slot = pool.acquire();
    if (item.slot < 0) return;
    const exec::Stopwatch busy;
    if (io::has_torch_dtype(t.dtype))
      item.data = torch::from_blob(pool.data(item.slot), t.shape, torch::TensorOptions().dtype(io::to_torch(t.dtype)));
    else
      item.data = torch::from_blob(pool.data(item.slot), {static_cast<int64_t>(t.nbytes())}, torch::kUInt8);
    if (t.nbytes() > 0) reader.read(header_.data_start + t.begin, pool.data(item.slot), t.nbytes());
    report_.read_seconds += busy.seconds();
    if (!read_q.push(std::move(item))) return;
  }
  read_q.close();
}

void MergeDriver::compute_stage(exec::BoundedQueue<Item>& read_q, exec::BoundedQueue<Item>& done_q) {
  ComputeThread scope(options_.threads);
  Item item;
  while (read_q.pop(item)) {
    auto out = compute_(item.index, item.data);
    if (!out.is_same(item.data)) item.out = out;
    if (!done_q.push(std::move(item))) return;
  }
  done_q.close();
}

void MergeDriver::write_stage(io::SafetensorsWriter& writer, io::SlotPool& pool, exec::BoundedQueue<Item>& done_q) {
  Item item;
  uint64_t bytes_done = 0;
  while (done_q.pop(item)) {
    const auto& t = header_.tensors[item.index];
    const exec::Stopwatch busy;
    if (item.out.defined()) {
      writer.write(t.name, item.out);
      report_.bytes_written += static_cast<uint64_t>(item.out.nbytes());
    } else {
      writer.write_bytes(t.name, pool.data(item.slot), t.nbytes());
      report_.bytes_written += t.nbytes();
    }
    const size_t index = item.index;
    pool.release(item.slot);
    item = Item();  // free before asking for more
    report_.write_seconds += busy.seconds();
    bytes_done += t.nbytes();
    written(index, bytes_done);
  }
}

void MergeDriver::written(size_t index, uint64_t bytes_done) {
  const auto& key = header_.tensors[index].name;
  const bool modified = plan_.touches(key);
  ++report_.tensors;
  if (modified) ++report_.modified;
  // Test hook: a pause after each tensor, so that tests can interrupt a merge of small files midway.
  static const int test_delay_ms = [] {
    const char* v = std::getenv("LYCORIS_MERGE_TEST_DELAY_MS");
    return v ? std::atoi(v) : 0;
  }();
  if (test_delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(test_delay_ms));
  if (!options_.on_progress) return;
  MergeProgress p;
  p.index = index + 1;
  p.total = header_.tensors.size();
  p.key = &key;
  p.modified = modified;
  p.bytes_done = bytes_done;
  p.bytes_total = bytes_total_;
  p.seconds = since_start_.seconds();
  options_.on_progress(p);
}

// The base's tensors that get merged must be writable in their output dtype.
void check_output_dtypes(const OutputLayout& layout, const MergePlan& plan) {
  for (size_t i = 0; i < layout.decls.size(); ++i)
    if (plan.touches(layout.decls[i].name) && !io::has_torch_dtype(layout.dtypes[i]))
      throw OptionError(layout.decls[i].name + ": cannot write a merged tensor as " + io::dtype_name(layout.dtypes[i]) +
                        " (choose an output dtype)");
}

}  // namespace

MergeReport merge(const std::string& base_path, const std::string& output, const MergeOptions& options) {
  const exec::Stopwatch since_start;
  io::check_output_path(output);  // before the adapters are even opened
  MergeReport report;
  auto warn = [&](const std::string& w) {
    report.warnings.push_back(w);
    if (options.on_warning) options.on_warning(w);
  };
  if (options.threads > 0) at::set_num_threads(options.threads);
  exec::SingleThreadedBlas blas;
  // This thread loads the adapters (small tensors) and writes: torch single-threaded here, so that no
  // OpenMP team spins between its tiny parallel regions (≈ 6% of a merge's CPU time, measured); the
  // compute thread and the chunk workers set their own. The caller's setting comes back on return.
  exec::IntraOpThreads one_thread(1);

  auto base = io::SafetensorsFile::open(base_path);
  const auto& header = base.header();
  std::map<std::string, std::vector<int64_t>> shapes;
  std::vector<std::string> keys;
  for (const auto& t : header.tensors) {
    shapes[t.name] = t.shape;
    keys.push_back(t.name);
  }
  const naming::Resolver names(keys, options.base_format);
  const auto layout = output_layout(header, options.dtype);
  auto metadata = header.metadata;
  {
    auto it = metadata.find("lycoris_merge");
    metadata["lycoris_merge"] = merge_record(options.adapters, options.dtype, it == metadata.end() ? "" : it->second);
  }
  auto rewriter = start_rewriter(base_path, header, output, metadata, layout.same_dtypes, options);

  const auto plan = plan_merge(options, names, shapes, warn);
  report.modules_applied = plan.modules_applied;
  check_output_dtypes(layout, plan);
  report.load_seconds = since_start.seconds();

  TensorMerger compute(base, plan, layout.dtypes, options);
  MergeDriver driver(header, plan, compute, options, layout.bytes_total, report, since_start);
  if (rewriter)
    driver.in_place(*rewriter);
  else
    driver.buffered(base_path, output, layout.decls, metadata);
  report.compute_seconds = compute.seconds();
  report.total_seconds = since_start.seconds();
  return report;
}

}  // namespace lycoris::tools
