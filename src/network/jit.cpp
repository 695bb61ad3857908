// Networks on TorchScript modules and .pt archives (lycoris/jit.hpp, docs/training.md#torchscript): the
// network code of network.cpp over host_module(torch::jit::Module), plus the errors a TorchScript model
// needs that a torch::nn one does not (a file that matches nothing, a targeted layer that cannot be adapted).
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "internal.hpp"
#include "io/atomic_file.hpp"
#include "lycoris/adapter_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/jit.hpp"
#include "lycoris/naming.hpp"

namespace lycoris {

namespace {

// A file module naming a layer the host view rejects would otherwise be "matches no layer": say why.
void refuse_rejected_targets(const HostModulePtr& host, const std::string& file, const Preset& preset) {
  std::set<std::string> names;
  for (const auto& [name, tensors] : group_modules(io::SafetensorsFile::open(file))) names.insert(name);
  std::vector<std::string> prefixes = {preset.lora_prefix};
  for (const auto& p : naming::known_prefixes()) prefixes.push_back(p);
  for (const auto& [path, node] : preorder(host)) {
    std::string why;
    if (path.empty() || node->layer(&why) || why.empty()) continue;
    for (const auto& p : prefixes)
      if (const auto name = naming::module_name(p, path); names.count(name))
        throw Error(file + ": module " + name + " targets '" + path + "' (" + node->type_name() +
                    ") of the TorchScript model, which cannot be adapted: " + why);
  }
}

}  // namespace

LycorisNetwork create_lycoris(const torch::jit::Module& model, NetworkOptions opts) {
  return LycorisNetwork(host_module(model), std::move(opts));
}

LycorisNetwork create_lycoris(const torch::jit::Module& model, double multiplier, int64_t linear_dim,
                              double linear_alpha, NetworkOptions opts) {
  return create_lycoris(model, detail::with_positional(std::move(opts), multiplier, linear_dim, linear_alpha));
}

LycorisNetwork create_lycoris_from_weights(const torch::jit::Module& model, const std::string& file,
                                           double multiplier, const Preset& preset) {
  const auto host = host_module(model);
  refuse_rejected_targets(host, file, preset);
  return create_lycoris_from_weights(host, file, multiplier, preset);  // KeyError when nothing matches
}

namespace torchscript {

TrainingScope::TrainingScope() : previous_(torch::jit::getGraphExecutorOptimize()) {
  torch::jit::setGraphExecutorOptimize(false);
}
TrainingScope::~TrainingScope() { torch::jit::setGraphExecutorOptimize(previous_); }

bool is_archive(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::string(magic, 4) == std::string("PK\x03\x04", 4);
}

torch::jit::Module load(const std::string& path) {
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw IOError(path + ": cannot open: " + std::strerror(errno));
  }
  if (!is_archive(path))
    throw FormatError(path + ": not a TorchScript archive (a .pt file written by torch.jit.save / module.save "
                             "starts with a ZIP header)");
  try {
    return torch::jit::load(path);
  } catch (const c10::Error& e) {
    // torch's message carries a C++ backtrace after its first line
    std::string what = e.what_without_backtrace();
    if (const auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
    throw FormatError(path + ": cannot read the TorchScript archive (truncated or damaged?): " + what);
  }
}

void save(const torch::jit::Module& module, const std::string& path) {
  std::ostringstream os;
  module.save(os);
  io::detail::write_atomically(path, os.str());
}

ArchiveMergeReport merge_archive(const std::string& base, const std::string& output,
                                 const std::vector<tools::MergeInput>& adapters, bool allow_unmatched) {
  const auto start = std::chrono::steady_clock::now();
  if (adapters.empty()) throw OptionError("merge: no adapter to merge into " + base);
  auto model = load(base);
  ArchiveMergeReport report;
  std::set<const void*> changed;
  for (const auto& a : adapters) {
    auto net = create_lycoris_from_weights(model, a.path, a.weight);
    for (const auto& w : net->warnings()) {
      if (!allow_unmatched) throw KeyError(w + " (--allow-unmatched skips such modules)");
      report.warnings.push_back(w);
    }
    net->merge_to(a.weight);
    report.modules_applied.push_back(net->modules().size());
    for (const auto& m : net->modules()) changed.insert(m.view->identity());
  }
  report.layers = changed.size();
  save(model, output);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace torchscript
}  // namespace lycoris
