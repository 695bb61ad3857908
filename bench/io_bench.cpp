// safetensors I/O throughput on a ~2 GB F16 file generated in /tmp (deleted afterwards):
//   write (streaming SafetensorsWriter, fsync + rename included), read zero-copy (mmap + touch every
//   page; mmap + torch sum of every tensor), read converted to F32 (tensor(name, kFloat32)),
// against the floor of the same file through `dd` (read to /dev/null; write with conv=fsync) and `cp`.
// The page cache is not dropped (needs root, machine-wide): reads are warm-cache numbers.
// Environment: LYCORIS_BENCH_DIR (default /tmp), LYCORIS_BENCH_MB (default 2048).
#include <benchmark/benchmark.h>
#include <sys/resource.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "lycoris/io/safetensors.hpp"

namespace {

using namespace lycoris::io;

constexpr int64_t kTensorElems = 4 << 20;  // 4 Mi F16 elements = 8 MiB per tensor
std::string g_dir, g_src, g_dst;
int64_t g_tensors = 0;
uint64_t g_bytes = 0;
std::vector<torch::Tensor> g_pool;  // a few distinct tensors cycled by the writer (no 2 GB in RAM)

std::vector<TensorDecl> decls() {
  std::vector<TensorDecl> d;
  for (int64_t i = 0; i < g_tensors; ++i)
    d.push_back({"layers." + std::to_string(i) + ".weight", DType::F16, {2048, kTensorElems / 2048}});
  return d;
}

void write_file(const std::string& path) {
  SafetensorsWriter w(path, decls(), {{"format", "pt"}});
  for (int64_t i = 0; i < g_tensors; ++i)
    w.write("layers." + std::to_string(i) + ".weight", g_pool[static_cast<size_t>(i) % g_pool.size()]);
  w.commit();
}

void shell(const std::string& cmd) {
  if (std::system(cmd.c_str()) != 0) throw std::runtime_error("failed: " + cmd);
}

void BM_write_streaming(benchmark::State& state) {
  for (auto _ : state) write_file(g_dst);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * g_bytes));
}

void BM_read_zero_copy_touch_pages(benchmark::State& state) {
  const long page = sysconf(_SC_PAGESIZE);
  for (auto _ : state) {
    auto f = SafetensorsFile::open(g_src);
    uint64_t acc = 0;
    for (const auto& info : f.tensors()) {
      const uint8_t* p = f.data(info);
      for (uint64_t off = 0; off < info.nbytes(); off += static_cast<uint64_t>(page)) acc += p[off];
    }
    benchmark::DoNotOptimize(acc);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * g_bytes));
}

void BM_read_zero_copy_sum(benchmark::State& state) {
  for (auto _ : state) {
    auto f = SafetensorsFile::open(g_src);
    double acc = 0;
    for (const auto& info : f.tensors()) acc += f.tensor(info.name).sum().item<double>();
    benchmark::DoNotOptimize(acc);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * g_bytes));
}

void BM_read_convert_f32(benchmark::State& state) {
  for (auto _ : state) {
    auto f = SafetensorsFile::open(g_src);
    for (const auto& info : f.tensors()) {
      auto t = f.tensor(info.name, torch::kFloat32);
      benchmark::DoNotOptimize(t.data_ptr());
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * g_bytes));  // source bytes
}

void BM_floor_dd_read(benchmark::State& state) {
  for (auto _ : state) shell("dd if='" + g_src + "' of=/dev/null bs=16M status=none");
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * g_bytes));
}

void BM_floor_dd_write_fsync(benchmark::State& state) {
  for (auto _ : state) shell("dd if='" + g_src + "' of='" + g_dst + "' bs=16M conv=fsync status=none");
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * g_bytes));
}

void BM_floor_cp(benchmark::State& state) {
  for (auto _ : state) shell("cp '" + g_src + "' '" + g_dst + "'");
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * g_bytes));
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(2);
  const char* dir = std::getenv("LYCORIS_BENCH_DIR");
  const char* mb = std::getenv("LYCORIS_BENCH_MB");
  g_dir = dir ? dir : "/tmp";
  g_tensors = std::max<int64_t>(1, (mb ? std::atoll(mb) : 2048) / 8);
  g_bytes = static_cast<uint64_t>(g_tensors) * kTensorElems * 2;
  g_src = g_dir + "/lycoris-io-bench-" + std::to_string(getpid()) + ".safetensors";
  g_dst = g_dir + "/lycoris-io-bench-" + std::to_string(getpid()) + "-out.safetensors";
  for (int i = 0; i < 4; ++i) g_pool.push_back(torch::randn({2048, kTensorElems / 2048}).to(torch::kFloat16));
  std::cerr << "io_bench: generating " << g_bytes / (1 << 20) << " MiB F16 file " << g_src << "\n";
  write_file(g_src);
  {
    struct rusage ru {};
    getrusage(RUSAGE_SELF, &ru);  // before any mmap: the writer's own footprint
    std::cerr << "io_bench: peak RSS after streaming write " << ru.ru_maxrss / 1024 << " MiB\n";
  }

  benchmark::Initialize(&argc, argv);
  for (auto* b : {benchmark::RegisterBenchmark("write_streaming", BM_write_streaming),
                  benchmark::RegisterBenchmark("floor_dd_write_fsync", BM_floor_dd_write_fsync),
                  benchmark::RegisterBenchmark("floor_cp", BM_floor_cp),
                  benchmark::RegisterBenchmark("read_zero_copy_touch_pages", BM_read_zero_copy_touch_pages),
                  benchmark::RegisterBenchmark("read_zero_copy_sum", BM_read_zero_copy_sum),
                  benchmark::RegisterBenchmark("read_convert_f32", BM_read_convert_f32),
                  benchmark::RegisterBenchmark("floor_dd_read", BM_floor_dd_read)})
    b->Iterations(3)->Unit(benchmark::kMillisecond)->UseRealTime();
  int rc = 0;
  try {
    benchmark::RunSpecifiedBenchmarks();
  } catch (const std::exception& e) {
    std::cerr << "io_bench: " << e.what() << "\n";
    rc = 1;
  }
  std::filesystem::remove(g_src);
  std::filesystem::remove(g_dst);
  benchmark::Shutdown();
  return rc;
}
