// header_bench: parse_header on headers of many tensors (an adapter of tens of thousands of modules has
// a header of several MB). Parsing must stay linear in the tensor count.
//
//   cmake --build build -j2 --target header_bench && build/bench/header_bench
//
//   parse_header/<tensors>   the whole validation (JSON, entries, tiling) of an in-memory file whose
//                            header lists <tensors> F16 tensors of 4×8 (≈ 100 bytes of JSON each;
//                            100k: a 10 MB header, ~0.2 s of CPU on the 2-core VM)
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "lycoris/io/header.hpp"

namespace {

// A whole safetensors file (header and zeroed data) of `count` tensors named like a LoRA's.
std::vector<uint8_t> make_file(int64_t count) {
  constexpr uint64_t kBytes = 4 * 8 * 2;
  std::string json = "{\"__metadata__\":{\"format\":\"pt\"}";
  for (int64_t i = 0; i < count; ++i) {
    const auto begin = std::to_string(static_cast<uint64_t>(i) * kBytes);
    const auto end = std::to_string(static_cast<uint64_t>(i + 1) * kBytes);
    json += ",\"lycoris_layer" + std::to_string(i) + ".lora_down.weight\":{\"dtype\":\"F16\",\"shape\":[4,8]," +
            "\"data_offsets\":[" + begin + "," + end + "]}";
  }
  json += "}";
  std::vector<uint8_t> file(8 + json.size() + static_cast<uint64_t>(count) * kBytes, 0);
  for (int i = 0; i < 8; ++i) file[static_cast<size_t>(i)] = static_cast<uint8_t>(json.size() >> (8 * i));
  std::copy(json.begin(), json.end(), file.begin() + 8);
  return file;
}

void BM_parse_header(benchmark::State& state) {
  const auto file = make_file(state.range(0));
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | file[static_cast<size_t>(i)];
  for (auto _ : state) {
    auto h = lycoris::io::parse_header(file.data(), file.size(), "bench.safetensors");
    if (h.tensors.size() != static_cast<size_t>(state.range(0))) state.SkipWithError("wrong tensor count");
    benchmark::DoNotOptimize(h);
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(header_bytes));  // JSON bytes
  state.counters["header_MB"] = static_cast<double>(header_bytes) / 1e6;
}
BENCHMARK(BM_parse_header)->Name("parse_header")->Arg(20000)->Arg(40000)->Arg(100000)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
