#include "lycoris/functional/common.hpp"

#include <sstream>

#include "lycoris/error.hpp"

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

std::string shape_str(torch::IntArrayRef shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

}  // namespace lycoris::functional
