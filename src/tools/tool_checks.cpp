#include "tool_checks.hpp"

#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <exception>

#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"

namespace lycoris::tools {

namespace {

bool begins_with_name(const std::string& text, const std::string& name) {
  if (name.empty() || text.compare(0, name.size(), name) != 0) return false;
  return text.size() == name.size() || text[name.size()] == ':' || text[name.size()] == '.' ||
         text[name.size()] == ' ';
}

}  // namespace

int64_t count_nonfinite(const torch::Tensor& t) {
  if (!torch::isFloatingType(t.scalar_type()) || t.numel() == 0) return 0;
  bool finite = false;
  if (t.element_size() == 2) {
    // F16/BF16 float reductions run one element at a time in torch 1.13: test the bits instead (NaN/Inf ⇔
    // every exponent bit set ⇔ the bits without the sign are at least those of +Inf)
    const int inf_bits = t.scalar_type() == torch::kHalf ? 0x7C00 : 0x7F80;
    finite = t.view(torch::kInt16).bitwise_and(0x7FFF).max().item<int>() < inf_bits;
  } else {
    // reductions without a temporary: max and min are NaN when any value is, ±Inf when any value is
    finite = std::isfinite(t.max().item<double>()) && std::isfinite(t.min().item<double>());
  }
  if (finite) return 0;
  return (~torch::isfinite(t)).sum().item<int64_t>();
}

void require_finite(const torch::Tensor& t, const std::string& where, const std::string& key) {
  if (const int64_t n = count_nonfinite(t); n > 0)
    throw FormatError(where + ": tensor '" + key + "' has " + std::to_string(n) + " NaN/Inf value(s)");
}

torch::Tensor round_finite(const torch::Tensor& t, torch::ScalarType dtype, const std::string& where,
                           const std::string& key, const std::string& hint) {
  auto out = t.to(dtype);
  if (count_nonfinite(out) == 0) return out;
  if (count_nonfinite(t) > 0)
    throw Error(where + ": " + key + ": the computation produced NaN/Inf values (inputs too large for " +
                io::dtype_name(io::from_torch(t.scalar_type())) + " arithmetic)");
  char largest[32];
  std::snprintf(largest, sizeof largest, "%.4g", t.abs().max().item<double>());
  throw Error(where + ": " + key + ": values up to " + largest + " overflow " +
              io::dtype_name(io::from_torch(dtype)) + (hint.empty() ? "" : ": " + hint));
}

void rethrow_with_context(const std::vector<std::string>& files, const std::string& subject) {
  const std::string file = files.empty() ? std::string() : files.front();
  auto in_context = [&](const std::string& message) {
    for (const auto& f : files)
      if (begins_with_name(message, f)) return message;
    std::string out = file.empty() ? "" : file + ": ";
    if (!begins_with_name(message, subject)) out += subject + ": ";
    return out + message;
  };
  try {
    throw;
  } catch (const c10::Error& e) {
    // torch's what() carries a C++ backtrace; its message proper is the first line
    const std::string& msg = e.msg();
    throw Error(in_context(msg.substr(0, msg.find('\n'))));
  } catch (const KeyError& e) {
    throw KeyError(in_context(e.what()));
  } catch (const ShapeError& e) {
    throw ShapeError(in_context(e.what()));
  } catch (const FormatError& e) {
    throw FormatError(in_context(e.what()));
  } catch (const OptionError& e) {
    throw OptionError(in_context(e.what()));
  } catch (const IOError& e) {
    throw IOError(in_context(e.what()));
  } catch (const Error& e) {
    throw Error(in_context(e.what()));
  }
}

}  // namespace lycoris::tools
