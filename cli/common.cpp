#include "common.hpp"

#include <torch/cuda.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "lycoris/error.hpp"
#include "lycoris/io/dtype.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/text.hpp"

namespace lycoris::cli {

double parse_weight(const std::string& text, bool force) {
  const std::string shown = "-w '" + escape_control(text) + "'";
  const char* begin = text.c_str();
  char* end = nullptr;
  errno = 0;
  const double w = std::strtod(begin, &end);
  if (text.empty() || end == begin || *end != '\0' || std::isspace(static_cast<unsigned char>(text[0])))
    throw OptionError(shown + ": not a number");
  if (!std::isfinite(w) || (errno == ERANGE && std::fabs(w) > 1))
    throw OptionError(shown + ": the weight must be a finite number");
  if (std::fabs(w) > kMaxWeight && !force)
    throw OptionError(shown + ": weights beyond ±1e6 overflow every half-precision output; add --force if you "
                      "mean it");
  return w;
}

torch::Device parse_device(const std::string& text) {
  std::optional<torch::Device> device;
  try {
    device = torch::Device(text);
  } catch (const std::exception&) {
    throw OptionError("--device: '" + escape_control(text) + "': unknown device (cpu, cuda, cuda:N, mps)");
  }
  if (device->is_cpu()) return *device;
  if (device->is_cuda()) {
    if (!torch::cuda::is_available())
      throw OptionError("--device: '" + text + "': this build of libtorch has no CUDA (or no CUDA device is visible)");
    const auto count = static_cast<int64_t>(torch::cuda::device_count());
    if (device->has_index() && device->index() >= count)
      throw OptionError("--device: '" + text + "': there are only " + std::to_string(count) + " CUDA device(s)");
    return *device;
  }
  if (device->is_mps()) {
    if (!at::hasMPS()) throw OptionError("--device: '" + text + "': this build of libtorch has no MPS");
    return *device;
  }
  throw OptionError("--device: '" + text + "': not supported (cpu, cuda, cuda:N, mps)");
}

std::optional<torch::ScalarType> parse_dtype(const std::string& text, std::initializer_list<torch::ScalarType> allowed,
                                             bool keep) {
  if (keep && text == "keep") return std::nullopt;
  io::DType d;
  if (io::parse_user_dtype(text, d) && io::has_torch_dtype(d))
    for (auto t : allowed)
      if (io::to_torch(d) == t) return t;
  std::string known = keep ? "keep" : "";
  for (auto t : allowed) known += (known.empty() ? "" : ", ") + io::dtype_spelling(io::from_torch(t));
  throw OptionError("--dtype: unknown dtype '" + escape_control(text) + "' (" + known + ")");
}

int thread_count(int requested) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (requested < 0) throw OptionError("--threads: must be ≥ 0 (0: every hardware thread), got " + std::to_string(requested));
  if (requested == 0) return cores;
  if (requested > cores) {
    warn("--threads " + std::to_string(requested) + " is more than the " + std::to_string(cores) +
         " hardware thread(s): using " + std::to_string(cores));
    return cores;
  }
  return requested;
}

void warn(const std::string& text) { std::cerr << "lycoris: warning: " << escape_control(text) << "\n"; }

void print_error(const std::string& text) { std::cerr << "lycoris: error: " << escape_control(text) << "\n"; }

}  // namespace lycoris::cli
