#include "lycoris/functional/common.hpp"

#include <torch/torch.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <sstream>

#include "exec/arena.hpp"
#include "lycoris/error.hpp"
#include "lycoris/text.hpp"

namespace lycoris::functional {

double scalar_value(const torch::Tensor& t, const std::string& module, const std::string& key) {
  if (!t.defined() || t.numel() != 1 || t.dim() > 1)
    throw ShapeError(module + "." + key + ": expected a single value of shape [] or [1], got " +
                     (t.defined() ? shape_str(t.sizes()) : std::string("nothing")));
  if (t.scalar_type() == torch::kBool)
    throw ShapeError(module + "." + key + ": expected a number, got a bool tensor");
  return t.to(torch::kCPU).to(torch::kFloat64).item<double>();
}

const torch::Tensor& require(const TensorMap& tensors, const std::string& key, const std::string& module) {
  auto it = tensors.find(key);
  if (it == tensors.end()) {
    std::string has;
    for (const auto& kv : tensors) has += (has.empty() ? "" : ", ") + kv.first;
    throw KeyError(module + ": missing key '" + key + "' (has: " + has + ")");
  }
  return it->second;
}

torch::Tensor optional(const TensorMap& tensors, const std::string& key) {
  auto it = tensors.find(key);
  return it == tensors.end() ? torch::Tensor() : it->second;
}

void expect_shape(const torch::Tensor& t, torch::IntArrayRef expected, const std::string& module,
                  const std::string& key, const std::string& why) {
  if (t.sizes() != expected)
    throw ShapeError(module + "." + key + ": expected shape " + shape_str(expected) + ", got " +
                     shape_str(t.sizes()) + (why.empty() ? "" : " (" + why + ")"));
}

torch::Tensor flat(const torch::Tensor& t) { return t.reshape({t.size(0), -1}); }

torch::ScalarType compute_dtype(const torch::Tensor& like) {
  return like.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
}

torch::Tensor to_compute(const torch::Tensor& t, const torch::Tensor& like) {
  return t.to(compute_dtype(like));
}

std::string shape_str(torch::IntArrayRef shape) { return shape_text(shape.vec()); }

}  // namespace lycoris::functional

namespace lycoris::functional {

torch::Tensor with_unit_kernel(const torch::Tensor& w2d, int64_t ndim) {
  std::vector<int64_t> shape{w2d.size(0), w2d.size(1)};
  shape.resize(static_cast<size_t>(std::max<int64_t>(ndim, 2)), 1);
  return w2d.reshape(shape);
}

torch::Tensor host_op(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& w) {
  switch (layer.kind) {
    case LayerKind::Linear: return torch::matmul(x, w.t());
    case LayerKind::Conv1d: return torch::conv1d(x, w, {}, layer.stride, layer.padding, layer.dilation);
    case LayerKind::Conv2d: return torch::conv2d(x, w, {}, layer.stride, layer.padding, layer.dilation);
    case LayerKind::Conv3d: return torch::conv3d(x, w, {}, layer.stride, layer.padding, layer.dilation);
    default: throw OptionError("host_op: " + layer.describe() + " is not a Linear or Conv layer");
  }
}

torch::Tensor pointwise_op(const torch::Tensor& x, const LayerSpec& layer, const torch::Tensor& w2d) {
  switch (layer.kind) {
    case LayerKind::Linear: return torch::matmul(x, w2d.t());
    case LayerKind::Conv1d: return torch::conv1d(x, with_unit_kernel(w2d, 3));
    case LayerKind::Conv2d: return torch::conv2d(x, with_unit_kernel(w2d, 4));
    case LayerKind::Conv3d: return torch::conv3d(x, with_unit_kernel(w2d, 5));
    default: throw OptionError("pointwise_op: " + layer.describe() + " is not a Linear or Conv layer");
  }
}

bool module_dropped(double module_dropout, bool training) {
  return training && module_dropout > 0 && torch::rand({1}).item<double>() < module_dropout;
}

torch::Tensor keep_mask(int64_t n, double p, bool rescale, const torch::TensorOptions& options) {
  auto mask = (torch::rand({n}, options) > p).to(options.dtype());
  if (rescale) {
    auto mean = mask.mean();
    mask = torch::where(mean > 0, mask / mean.clamp_min(1e-12), mask);
  }
  return mask;
}

torch::Tensor drop_rows(const torch::Tensor& dw, double p, bool rescale) {
  std::vector<int64_t> shape(static_cast<size_t>(dw.dim()), 1);
  shape[0] = dw.size(0);
  return dw * keep_mask(dw.size(0), p, rescale, dw.options()).view(shape);
}

}  // namespace lycoris::functional

namespace lycoris::functional {

void expect_keys(const TensorMap& tensors, const std::vector<std::string>& allowed, const std::string& module,
                 const std::string& algo) {
  std::string unknown;
  for (const auto& kv : tensors)
    if (std::find(allowed.begin(), allowed.end(), kv.first) == allowed.end())
      unknown += (unknown.empty() ? "'" : ", '") + kv.first + "'";
  if (unknown.empty()) return;
  std::string list;
  for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
  throw KeyError(module + ": unknown key(s) " + unknown + " for " + algo + " (allowed: " + list + ")");
}

std::string unsupported_layer(const LayerSpec& layer) {
  if (layer.kind != LayerKind::Linear && !layer.is_conv())
    return layer.describe() + " is not a Linear or Conv1d/2d/3d layer";
  if (layer.is_conv() && layer.groups != 1)
    return layer.describe() + " has groups = " + std::to_string(layer.groups) + " (grouped convolutions are not supported)";
  return empty_weight(layer);
}

std::string empty_weight(const LayerSpec& layer) {
  const auto shape = layer.weight_shape();
  for (int64_t d : shape)
    if (d < 1) return layer.describe() + " has an empty weight " + shape_str(shape);
  return {};
}

void expect_rank(int64_t rank, const torch::Tensor& t, const std::string& module, const std::string& key) {
  if (rank < 1)
    throw FormatError(module + ": rank " + std::to_string(rank) + " (" + key + " has shape " + shape_str(t.sizes()) + ")");
}

torch::Tensor owned_float(const torch::Tensor& t) {
  const auto dtype = t.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  torch::Tensor out;
  if (t.is_cpu()) out = exec::OwnedFloatArena::take(t.sizes(), dtype);
  if (!out.defined()) out = torch::empty(t.sizes(), t.options().dtype(dtype));
  convert_into(out, t.contiguous());
  return out;
}

namespace {

// fp16 ↔ fp32 with the CPU's F16C instructions (IEEE round-to-nearest-even, as c10::Half): torch 1.13
// converts element by element in software (3 Gelem/s measured: the largest cost of a merge's chunk, and
// most of loading an fp16 adapter).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx,f16c"))) void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
__attribute__((target("avx,f16c"))) void float_to_half(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
bool has_f16c() {
  // F16C from CPUID leaf 1 (clang before 16 has no "f16c" for __builtin_cpu_supports)
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __builtin_cpu_supports("avx") && __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
  }();
  return yes;
}
#endif

}  // namespace

void convert_into(const torch::Tensor& dst, const torch::Tensor& src) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_f16c() && dst.is_contiguous() && src.is_contiguous() && dst.is_cpu() && src.is_cpu() &&
      dst.sizes() == src.sizes()) {
    if (src.scalar_type() == torch::kHalf && dst.scalar_type() == torch::kFloat32) {
      half_to_float(reinterpret_cast<const uint16_t*>(src.data_ptr()), dst.data_ptr<float>(), dst.numel());
      return;
    }
    if (src.scalar_type() == torch::kFloat32 && dst.scalar_type() == torch::kHalf) {
      float_to_half(src.data_ptr<float>(), reinterpret_cast<uint16_t*>(dst.data_ptr()), dst.numel());
      return;
    }
  }
#endif
  dst.copy_(src);
}

double overflow_threshold(torch::ScalarType dtype) {
  // max finite value + half its ulp: values from there on round up to Inf (the tie goes to the even
  // significand, which is Inf's)
  switch (dtype) {
    case torch::kFloat16: return 65520.0;
    case torch::kBFloat16: return std::ldexp(1.0, 128) - std::ldexp(1.0, 119);
    case torch::kFloat32: return std::ldexp(1.0, 128) - std::ldexp(1.0, 103);
    default: return std::numeric_limits<double>::infinity();
  }
}

bool finite_in(const torch::Tensor& t, torch::ScalarType dtype) {
  if (t.numel() == 0 || !t.is_floating_point()) return true;
  // min and max in one pass; NaN propagates into both
  auto [lo, hi] = torch::aminmax(t);
  const double limit = overflow_threshold(dtype);
  const double a = lo.item<double>(), b = hi.item<double>();
  return std::isfinite(a) && std::isfinite(b) && -a < limit && b < limit;
}

}  // namespace lycoris::functional
