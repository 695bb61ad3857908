// The default random generators a network's draws use (dropouts, DyLoRA's block), saved and restored by
// training checkpoints (docs/training.md#checkpoint-and-resume).
#include <ATen/Context.h>
#include <torch/torch.h>

#include <mutex>
#include <set>

#include "internal.hpp"
#include "lycoris/error.hpp"

namespace lycoris::detail {

namespace {

// Devices by (type, index), CPU first.
struct DeviceLess {
  bool operator()(const torch::Device& a, const torch::Device& b) const {
    return std::make_pair(a.type(), a.index()) < std::make_pair(b.type(), b.index());
  }
};

}  // namespace

GeneratorStates generator_states(const torch::nn::Module& module) {
  std::set<torch::Device, DeviceLess> devices{torch::Device(torch::kCPU)};
  for (const auto& t : module.parameters()) devices.insert(t.device());
  for (const auto& t : module.buffers()) devices.insert(t.device());
  GeneratorStates out;
  for (const auto& d : devices) {
    if (!d.is_cpu() && !d.is_cuda()) continue;  // no default generator to save (nor draws from one here)
    auto gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    out.emplace_back(d, gen.get_state());
  }
  return out;
}

void set_generator_states(const GeneratorStates& states) {
  for (const auto& [device, state] : states) {
    const bool present = device.is_cpu() || (device.is_cuda() && torch::cuda::is_available() &&
                                             static_cast<size_t>(device.index()) < torch::cuda::device_count());
    if (!present)
      throw Error("random generator of " + device.str() + ": no such device here");
    auto gen = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    try {
      gen.set_state(state);
    } catch (const c10::Error& e) {
      throw Error("random generator of " + device.str() + ": invalid state (" + e.what_without_backtrace() + ")");
    }
  }
}

}  // namespace lycoris::detail
