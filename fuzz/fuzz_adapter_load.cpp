// libFuzzer target: safetensors files with a valid header (decoded from the input, adapter_input.hpp) through
// the adapter loading path — SafetensorsFile → group_modules → load_adapter (or a forced registry entry, or
// load_adapter_for_base as merge/check use it) — and every loaded module applied to a small weight:
// apply_weight, apply_bias, tools::merge_tensor, bypass_forward and a save/reload round trip.
// Contract: loading either succeeds or throws a lycoris::Error whose message is one line naming the module
// (or the file); a loaded module then works: outputs of the layer's shapes, merge_tensor and bypass_forward
// agreeing with apply_weight, its file_tensors() loading again to the same weight. Anything else — another
// exception (c10::Error from torch), a sanitizer report, a hang — is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <torch/torch.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "adapter_input.hpp"
#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/layer.hpp"
#include "exec/threads.hpp"
#include "tools/merge/merge_tensor.hpp"

namespace {

using namespace lycoris;
namespace fz = lycoris::fuzz;

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "\n==== fuzz_adapter_load finding: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

void require(bool ok, const std::string& what) {
  if (!ok) finding(what);
}

// LYCORIS_FUZZ_VERBOSE=1: what happened to each module (to read a reproducer); LYCORIS_FUZZ_DUMP=<path>: the
// decoded safetensors file is written there.
void note(const std::string& what) {
  static const bool verbose = std::getenv("LYCORIS_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "fuzz_adapter_load: %s\n", what.c_str());
}

// A lycoris::Error must be one line naming one of `names` (the module, or the file).
void check_error(const Error& e, const std::vector<std::string>& names) {
  const std::string msg = e.what();
  note("rejected: " + msg);
  require(msg.find('\n') == std::string::npos, "multi-line error message: " + msg);
  for (const auto& n : names)
    if (msg.find(n) != std::string::npos) return;
  finding("error message names neither the module nor the file: " + msg);
}

// ---------------------------------------------------------------- the file

float to_f32(double v) {
  if (std::isnan(v)) return std::numeric_limits<float>::quiet_NaN();
  if (v > std::numeric_limits<float>::max()) return std::numeric_limits<float>::infinity();
  if (v < -std::numeric_limits<float>::max()) return -std::numeric_limits<float>::infinity();
  return static_cast<float>(v);
}

template <class T>
void put_int(std::string& out, double v) {
  T x = 0;
  if (!std::isnan(v))
    x = v <= static_cast<double>(std::numeric_limits<T>::min())   ? std::numeric_limits<T>::min()
        : v >= static_cast<double>(std::numeric_limits<T>::max()) ? std::numeric_limits<T>::max()
                                                                  : static_cast<T>(v);
  out.append(reinterpret_cast<const char*>(&x), sizeof x);
}

// One element of `dtype` with value v (F8: the byte `raw` itself).
void put(std::string& out, const std::string& dtype, double v, uint8_t raw) {
  auto bytes = [&](const auto& x) { out.append(reinterpret_cast<const char*>(&x), sizeof x); };
  if (dtype == "F64") bytes(v);
  else if (dtype == "F32") bytes(to_f32(v));
  else if (dtype == "F16") bytes(c10::Half(to_f32(v)).x);
  else if (dtype == "BF16") bytes(c10::BFloat16(to_f32(v)).x);
  else if (dtype == "I64") put_int<int64_t>(out, v);
  else if (dtype == "I32") put_int<int32_t>(out, v);
  else if (dtype == "I16") put_int<int16_t>(out, v);
  else if (dtype == "I8") put_int<int8_t>(out, v);
  else if (dtype == "U8") put_int<uint8_t>(out, v);
  else if (dtype == "BOOL") out.push_back(v != 0 ? 1 : 0);
  else out.push_back(static_cast<char>(raw));  // F8_E4M3 / F8_E5M2
}

std::string tensor_bytes(const fz::TensorDesc& t) {
  const size_t n = fz::capped_numel(t.shape);
  if (t.fill == fz::Fill::Raw) return std::string(t.payload.begin(), t.payload.end());
  const auto& specials = fz::special_values();
  std::string out;
  uint64_t state = t.payload.empty() ? 0 : t.payload[0];
  for (size_t i = 0; i < n; ++i) {
    double v = 0;
    uint8_t raw = 0;
    switch (t.fill) {
      case fz::Fill::Specials:
        raw = t.payload[i];
        v = specials[raw % specials.size()];
        break;
      case fz::Fill::Random:
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        raw = static_cast<uint8_t>(state >> 56);
        v = static_cast<double>(state >> 11) / 9007199254740992.0 * 2 - 1;  // [-1, 1)
        break;
      case fz::Fill::Constant:
        raw = t.payload[0];
        v = specials[raw % specials.size()];
        break;
      default: break;
    }
    put(out, t.dtype, v, raw);
  }
  return out;
}

// The safetensors bytes of the input's tensors (first of each name; "__metadata__" left out).
std::string serialize(const fz::Input& in) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  std::string data;
  std::set<std::string> seen;
  for (const auto& t : in.tensors) {
    if (t.name == "__metadata__" || !seen.insert(t.name).second) continue;
    const uint64_t begin = data.size();
    data += tensor_bytes(t);
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {begin, uint64_t{data.size()}}}};
  }
  std::string h = header.dump();
  h.resize((h.size() + 7) / 8 * 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + h + data;
}

// The file lives in memory; SafetensorsFile opens it by path like any other.
const std::string& write_file(const std::string& bytes) {
  static const int fd = memfd_create("fuzz_adapter_load", MFD_CLOEXEC);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  require(fd >= 0, "memfd_create failed");
  require(ftruncate(fd, 0) == 0 && pwrite(fd, bytes.data(), bytes.size(), 0) == static_cast<ssize_t>(bytes.size()),
          "cannot write the memfd");
  return path;
}

// ---------------------------------------------------------------- the layer and its tensors

bool make_layer(const fz::Input& in, LayerSpec& layer) {
  const bool bias = in.flags & fz::kHasBias;
  const int64_t O = in.out, I = in.in;
  switch (in.kind) {
    case 0: layer = LayerSpec::linear(I, O, bias); break;
    case 1:
    case 2:
    case 3: {
      std::vector<int64_t> k, s, p, d;
      for (size_t i = 0; i < in.kernel.size(); ++i) {
        k.push_back(in.kernel[i]);
        s.push_back(1 + in.stride[i]);
        p.push_back(in.padding[i]);
        d.push_back(1 + in.dilation[i]);
      }
      layer = LayerSpec::conv(I, O, k, s, p, d, 1 + in.groups, bias);
      break;
    }
    case 4: layer = LayerSpec::layer_norm(O, 1e-5, bias); break;
    default: {
      const int64_t g = 1 + in.groups;
      layer = LayerSpec::group_norm(O % g == 0 ? g : 1, O, 1e-5, bias);  // a valid GroupNorm
    }
  }
  return fz::capped_numel(layer.weight_shape()) != SIZE_MAX;
}

torch::ScalarType weight_dtype(const fz::Input& in) {
  static const torch::ScalarType t[] = {torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kFloat64};
  return t[(in.flags >> fz::kWeightDtypeShift) & 3];
}

torch::Tensor values(std::vector<int64_t> shape, torch::ScalarType dtype, double phase) {
  const int64_t n = c10::multiply_integers(shape);
  return torch::arange(n, torch::kFloat64).mul(0.618).add(phase).sin().reshape(shape).to(dtype);
}

// An input of the layer that gives at least one output position.
torch::Tensor layer_input(const LayerSpec& layer, torch::ScalarType dtype) {
  switch (layer.kind) {
    case LayerKind::Linear: return values({2, layer.in_features}, dtype, 0.3);
    case LayerKind::LayerNorm: return values({2, layer.out_features}, dtype, 0.3);
    case LayerKind::GroupNorm: return values({1, layer.out_features, 2}, dtype, 0.3);
    default: {
      std::vector<int64_t> shape{1, layer.in_features};
      for (size_t i = 0; i < layer.kernel.size(); ++i)
        shape.push_back(std::max<int64_t>(1, layer.dilation[i] * (layer.kernel[i] - 1) + 1) + (i == 0));
      return values(shape, dtype, 0.3);
    }
  }
}

// ---------------------------------------------------------------- a loaded module at work

// Values small enough that two evaluation orders agree to a relative tolerance.
bool tame(AdapterImpl& a, double m) {
  if (std::abs(m) > 3) return false;
  const double alpha = a.alpha();
  if (!std::isnan(alpha) && !(std::abs(alpha) <= 64)) return false;
  for (const auto& t : a.parameters())
    if (t.numel() > 0 && !(t.abs().max().item<double>() <= 8)) return false;
  for (const auto& t : a.buffers())
    if (t.numel() > 0 && t.is_floating_point() && !(t.abs().max().item<double>() <= 8)) return false;
  return true;
}

void expect_close(const torch::Tensor& got, const torch::Tensor& want, double tol, const std::string& what) {
  require(got.sizes() == want.sizes(), what + ": shape " + c10::str(got.sizes()) + " instead of " + c10::str(want.sizes()));
  auto g = got.to(torch::kFloat64), w = want.to(torch::kFloat64);
  if (!torch::isfinite(g).all().item<bool>() || !torch::isfinite(w).all().item<bool>()) return;
  const double diff = (g - w).abs().max().item<double>(), scale = 1 + w.abs().max().item<double>();
  require(diff <= tol * scale, what + ": differs by " + std::to_string(diff) + " (scale " + std::to_string(scale) + ")");
}

void exercise(AdapterImpl& a, const std::string& name, const LayerSpec& layer, const fz::Input& in) {
  a.eval();
  note("loaded " + name + ": " + a.algo() + " on " + layer.describe());
  const auto dtype = weight_dtype(in);
  const double m = fz::multipliers()[in.multiplier % fz::multipliers().size()];
  const bool numeric = tame(a, m);
  const double tol = dtype == torch::kFloat16 || dtype == torch::kBFloat16 ? 2e-2 : 1e-3;
  const std::string who = name + " (" + a.algo() + " on " + layer.describe() + ")";
  const auto W = values(layer.weight_shape(), dtype, 0.0);
  const auto b = layer.has_bias ? values({layer.out_features}, dtype, 1.0) : torch::Tensor();

  const auto out = a.apply_weight(W, m);
  require(out.defined() && out.sizes() == W.sizes() && out.scalar_type() == dtype,
          who + ": apply_weight gave " + (out.defined() ? c10::str(out.sizes(), " ", out.scalar_type()) : "nothing"));
  const auto out_b = a.apply_bias(b, m);
  if (out_b.defined())
    require(out_b.sizes() == torch::IntArrayRef{layer.out_features}, who + ": apply_bias gave " + c10::str(out_b.sizes()));

  // merge's compute stage: in place, or into another dtype
  const bool in_place = in.flags & fz::kMergeInPlace;
  auto x = W.clone();
  auto merged = in_place ? x : torch::empty(W.sizes(), dtype == torch::kFloat32 ? torch::kFloat64 : torch::kFloat32);
  tools::merge_tensor(x, merged, {tools::MergeStep{&a, m}});
  if (numeric) expect_close(merged, out, tol, who + ": merge_tensor vs apply_weight");
  if (b.defined()) {
    auto bx = b.clone();
    tools::merge_tensor(bx, bx, {tools::MergeStep{&a, m, /*bias=*/true}});
    if (numeric && out_b.defined()) expect_close(bx, out_b, tol, who + ": merge_tensor(bias) vs apply_bias");
  }

  if (in.flags & fz::kBypass) {
    // activations in fp32 (fp64 for fp64 weights): torch has no fp16 linear/conv on the CPU
    const auto xdtype = dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    auto as_x = [&](const torch::Tensor& t) { return t.defined() ? t.to(xdtype) : t; };
    const auto input = layer_input(layer, xdtype);
    const auto y = a.bypass_forward(input, W.to(xdtype), as_x(b), m);
    const auto ref = layer_forward(input, layer, out.to(xdtype), as_x(out_b));
    require(y.sizes() == ref.sizes(), who + ": bypass_forward gave " + c10::str(y.sizes()) + " instead of " +
                                          c10::str(ref.sizes()));
    if (numeric) expect_close(y, ref, tol * 10, who + ": bypass_forward vs layer_forward(apply_weight)");
  }

  if (in.flags & fz::kRoundTrip) {
    TensorMap saved;
    for (const auto& [k, v] : a.file_tensors()) saved.emplace(k, v);
    AdapterPtr again;
    try {
      again = find_algorithm(a.algo()).load(name, saved, layer);
    } catch (const Error& e) {
      finding(who + ": its file_tensors() do not load again: " + e.what());
    }
    again->eval();
    if (numeric) expect_close(again->apply_weight(W, m), out, tol, who + ": reloaded apply_weight");
  }
}

// ---------------------------------------------------------------- one input

void run(const fz::Input& in, const LayerSpec& layer) {
  const std::string bytes = serialize(in);
  if (const char* dump = std::getenv("LYCORIS_FUZZ_DUMP"))  // the decoded file, to replay it with the CLI
    std::ofstream(dump, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  const std::string& path = write_file(bytes);
  io::SafetensorsFile file;
  std::map<std::string, TensorMap> modules;
  try {
    file = io::SafetensorsFile::open(path);
    modules = group_modules(file);
  } catch (const FormatError& e) {  // e.g. BOOL bytes other than 0/1, a shape the parser rejects
    check_error(e, {path});
    return;
  }

  if (in.flags & fz::kForBase) {
    // the merge / check path: modules resolved against a base with layers m and n of this layer's shape
    std::vector<std::string> keys;
    std::map<std::string, std::vector<int64_t>> shapes;
    for (const char* p : {"m", "n"}) {
      keys.push_back(std::string(p) + ".weight");
      shapes[keys.back()] = layer.weight_shape();
      if (layer.has_bias) {
        keys.push_back(std::string(p) + ".bias");
        shapes[keys.back()] = {layer.out_features};
      }
    }
    AdapterLoadOptions options;
    options.layer_spec = [&](const naming::BaseLayer&, const std::vector<int64_t>&, bool) { return layer; };
    LoadedAdapter loaded;
    try {
      loaded = load_adapter_for_base(file, naming::Resolver(keys), shapes, options);
    } catch (const Error& e) {
      check_error(e, {path});
      return;
    }
    for (auto& m : loaded.modules) exercise(*m.adapter, m.name, layer, in);
    return;
  }

  const auto& registry = algorithms();
  const unsigned pick = in.algo % 32;  // mostly detect; else force one loader on whatever keys there are
  for (const auto& [name, tensors] : modules) {
    AdapterPtr a;
    try {
      a = pick < 16 ? load_adapter(name, tensors, layer) : registry[(pick - 16) % registry.size()].load(name, tensors, layer);
    } catch (const Error& e) {
      check_error(e, {name});
      continue;
    }
    require(a != nullptr, name + ": the loader returned nothing");
    exercise(*a, name, layer, in);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // small tensors, one input at a time: no intra-op or BLAS threads spinning next to the fuzzer
  torch::set_num_threads(1);
  static exec::SingleThreadedBlas blas;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz::Input in;
  LayerSpec layer;
  if (!fz::decode(data, size, in) || !make_layer(in, layer)) return 0;
  torch::NoGradGuard no_grad;  // as merge and check load and apply
  try {
    run(in, layer);
  } catch (const c10::Error& e) {
    finding(std::string("torch error: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    finding(std::string("exception: ") + e.what());
  }
  return 0;
}
