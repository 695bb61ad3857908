// The input format of fuzz_adapter_load: a byte string read front to back (reads past the end give 0)
// that describes a host layer, what to run, and the tensors of a safetensors file (names, dtypes, shapes,
// values). Decoding always yields a file with a valid header, so mutations land in the loaders and the
// math instead of the JSON parser. A sequential format (rather than FuzzedDataProvider, which reads
// integers from the end) lets make_adapter_seeds encode real adapter modules exactly.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace lycoris::fuzz {

// Key suffixes by index (a stable list: seeds refer to it). Anything else is spelled out literally.
inline const std::vector<std::string>& known_suffixes() {
  static const std::vector<std::string> k = {
      "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha",         "dora_scale",   "bias_indices",
      "bias_values",    "bias_size",        "hada_w1_a",       "hada_w1_b",     "hada_w2_a",    "hada_w2_b",
      "hada_t1",        "hada_t2",          "lokr_w1",         "lokr_w1_a",     "lokr_w1_b",    "lokr_w2",
      "lokr_w2_a",      "lokr_w2_b",        "lokr_t2",         "diff",          "diff_b",       "weight",
      "on_input",       "oft_blocks",       "rescale",         "a1.weight",     "a2.weight",    "b1.weight",
      "b2.weight",      "w_norm",           "b_norm",          "glokr_a_w1",    "glokr_a_w2",   "glokr_a_w2_a",
      "glokr_a_w2_b",   "glokr_b_w1",       "glokr_b_w1_a",    "glokr_b_w1_b",  "glokr_b_w2",   "glokr_b_w2_a",
      "glokr_b_w2_b",   "glokr_b_t2",       "bm_w",            "ba_w",          "scalar",       "bias",
  };
  return k;
}

// safetensors dtype names by index (io::DType order).
inline const char* dtype_by_index(uint8_t i) {
  static const char* names[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"};
  return names[i % 12];
}
inline size_t dtype_size(const std::string& d) {
  if (d == "F64" || d == "I64") return 8;
  if (d == "F32" || d == "I32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16") return 2;
  return 1;
}

// Values the `specials` fill picks from (one byte per element).
inline const std::vector<double>& special_values() {
  static const std::vector<double> v = {0.0,   -0.0,  1.0,    -1.0,   0.5,     2.0,     1e-3,   1e3,
                                        65504, 65520, 3.4e38, 1e300,  1e-40,   1e-8,    -2.0,   7.0,
                                        0.25,  -0.5,  1e-45,  -1e30,  __builtin_nan(""), __builtin_inf(),
                                        -__builtin_inf(), 3.0};
  return v;
}

enum class Fill : uint8_t { Raw = 0, Zeros, Specials, Random, Constant, kCount };

struct TensorDesc {
  std::string name;  // full key ("<module>.<suffix>" or anything)
  std::string dtype;
  std::vector<int64_t> shape;
  Fill fill = Fill::Raw;
  std::vector<uint8_t> payload;  // Raw: nbytes bytes; Specials: numel indices; Random/Constant: one byte
};

// What the harness does with the loaded modules.
enum Flags : uint8_t {
  kHasBias = 1,
  kWeightDtypeShift = 1,  // bits 1-2: F32, F16, BF16, F64
  kBypass = 8,            // bypass_forward against layer_forward of the merged weight
  kForBase = 16,          // load through load_adapter_for_base (the merge/check path) instead of load_adapter
  kRoundTrip = 32,        // file_tensors() must load again and give the same weight
  kMergeInPlace = 64,     // merge_tensor into its input (else into a tensor of another dtype)
};

struct Input {
  uint8_t kind = 0;  // LayerKind: Linear, Conv1d, Conv2d, Conv3d, LayerNorm, GroupNorm
  uint8_t out = 0, in = 0;
  std::vector<uint8_t> kernel, stride, padding, dilation;  // conv only (as many as its dimensions)
  uint8_t groups = 0;
  uint8_t flags = 0;
  uint8_t multiplier = 0;  // index into multipliers()
  uint8_t algo = 0;        // 0: detect; n: force the n-th registry entry (mod count)
  std::vector<TensorDesc> tensors;
};

inline const std::vector<double>& multipliers() {
  static const std::vector<double> m = {1.0, 0.7, 0.0, -1.5, 3.0, 1e-3, 1e4, 0.5};
  return m;
}

// Module names the module byte picks from (their base layers are "<m>.weight" / "<m>.bias").
inline const char* module_by_index(uint8_t i) { return i % 2 == 0 ? "lycoris_m" : "lycoris_n"; }

constexpr size_t kMaxNumel = 4096;
constexpr uint8_t kHugeDim = 0xFF;  // shape byte for a dimension of 2^40 (only loadable next to a 0)

inline int64_t dim_value(uint8_t b) { return b == kHugeDim ? (int64_t{1} << 40) : b; }

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : p_(data), n_(size) {}
  uint8_t u8() { return i_ < n_ ? p_[i_++] : 0; }
  std::vector<uint8_t> bytes(size_t k) {
    std::vector<uint8_t> out(k, 0);
    const size_t have = i_ < n_ ? std::min(k, n_ - i_) : 0;
    if (have) std::memcpy(out.data(), p_ + i_, have);
    i_ += have;
    return out;
  }
  std::string text(size_t max_len) {
    std::string s(u8() % (max_len + 1), ' ');
    for (auto& c : s) c = static_cast<char>(0x20 + u8() % 0x5f);  // printable ASCII: valid JSON strings
    return s;
  }
  bool done() const { return i_ >= n_; }

 private:
  const uint8_t* p_;
  size_t n_, i_ = 0;
};

// numel of a shape, or SIZE_MAX when above kMaxNumel.
inline size_t capped_numel(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape)
    if (d == 0) return 0;
  for (int64_t d : shape) {
    if (d > static_cast<int64_t>(kMaxNumel)) return SIZE_MAX;
    n *= static_cast<size_t>(d);
    if (n > kMaxNumel) return SIZE_MAX;
  }
  return n;
}

// false when the input describes something too big to be worth running.
inline bool decode(const uint8_t* data, size_t size, Input& in) {
  Reader r(data, size);
  in.kind = r.u8() % 6;
  in.out = r.u8() % 65;
  in.in = r.u8() % 65;
  const int nk = in.kind >= 1 && in.kind <= 3 ? in.kind : 0;
  for (int i = 0; i < nk; ++i) {
    in.kernel.push_back(r.u8() % 8);
    in.stride.push_back(r.u8() % 3);
    in.padding.push_back(r.u8() % 3);
    in.dilation.push_back(r.u8() % 2);
  }
  in.groups = r.u8() % 4;
  in.flags = r.u8();
  in.multiplier = r.u8();
  in.algo = r.u8();
  const int count = r.u8() % 12;
  for (int t = 0; t < count; ++t) {
    TensorDesc d;
    // module: lycoris_m, lycoris_n, a literal module name, or a literal whole key (maybe without a '.')
    const uint8_t m = r.u8() % 4;
    if (m == 3) {
      d.name = r.text(24);
    } else {
      const std::string module = m == 2 ? r.text(12) : module_by_index(m);
      const uint8_t k = r.u8() % 64;  // mostly known suffixes
      const auto& known = known_suffixes();
      d.name = module + "." + (k < known.size() ? known[k] : r.text(20));
    }
    d.dtype = dtype_by_index(r.u8());
    const int ndim = r.u8() % 6;
    for (int i = 0; i < ndim; ++i) d.shape.push_back(dim_value(r.u8()));
    const size_t numel = capped_numel(d.shape);
    if (numel == SIZE_MAX) return false;
    d.fill = static_cast<Fill>(r.u8() % static_cast<uint8_t>(Fill::kCount));
    switch (d.fill) {
      case Fill::Raw: d.payload = r.bytes(numel * dtype_size(d.dtype)); break;
      case Fill::Specials: d.payload = r.bytes(numel); break;
      case Fill::Random:
      case Fill::Constant: d.payload = r.bytes(1); break;
      default: break;
    }
    in.tensors.push_back(std::move(d));
  }
  return true;
}

// The inverse of decode for inputs it produced (used to write seeds; Raw fills only).
inline std::vector<uint8_t> encode(const Input& in) {
  std::vector<uint8_t> out{in.kind, in.out, in.in};
  for (size_t i = 0; i < in.kernel.size(); ++i)
    out.insert(out.end(), {in.kernel[i], in.stride[i], in.padding[i], in.dilation[i]});
  out.insert(out.end(), {in.groups, in.flags, in.multiplier, in.algo, static_cast<uint8_t>(in.tensors.size())});
  const auto& known = known_suffixes();
  for (const auto& t : in.tensors) {
    const auto dot = t.name.find('.');
    auto literal = [&](const std::string& s) {
      out.push_back(static_cast<uint8_t>(s.size()));
      for (char c : s) out.push_back(static_cast<uint8_t>(c - 0x20));
    };
    if (dot == std::string::npos) {
      out.push_back(3);
      literal(t.name);
    } else {
      const std::string module = t.name.substr(0, dot), suffix = t.name.substr(dot + 1);
      const uint8_t m = module == module_by_index(0) ? 0 : module == module_by_index(1) ? 1 : 2;
      out.push_back(m);
      if (m == 2) literal(module);
      size_t k = 0;
      while (k < known.size() && known[k] != suffix) ++k;
      out.push_back(static_cast<uint8_t>(k < known.size() ? k : 63));
      if (k == known.size()) literal(suffix);
    }
    uint8_t d = 0;
    while (std::string(dtype_by_index(d)) != t.dtype) ++d;
    out.push_back(d);
    out.push_back(static_cast<uint8_t>(t.shape.size()));
    for (int64_t s : t.shape) out.push_back(static_cast<uint8_t>(s));
    out.push_back(static_cast<uint8_t>(Fill::Raw));
    out.insert(out.end(), t.payload.begin(), t.payload.end());
  }
  return out;
}

}  // namespace lycoris::fuzz
