// Training checkpoints (checkpoint.hpp, docs/training.md#checkpoint-and-resume). One torch archive (ZIP):
//   "lycoris_checkpoint"  JSON text: format, step, extra, structure, multiplier, mode, per-step states,
//                         optimizer type and parameter groups, the devices of the generator states
//   "tensors"             the adapters' parameters and buffers, in network_structure order (CPU copies)
//   "grads"               the defined gradients, of the tensors listed in the JSON's "grads" (an optimizer
//                         updates a parameter whose gradient is defined, even zero, and skips one without)
//   "rng_now", "rng_refresh"  generator states at saving / before the last refresh, in the JSON's device order
//   "optimizer"           torch::optim::Optimizer::save (its per-parameter state; libtorch 1.13 does not
//                         restore the options from it, hence:)
//   "optimizer_options"   per parameter group i, "<i>": the group's options (OptimizerOptions::serialize)
#include "lycoris/checkpoint.hpp"

#include <c10/util/Type.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/torch.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "internal.hpp"
#include "io/atomic_file.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/dtype.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/network.hpp"
#include "lycoris/text.hpp"
#include "lycoris/version.hpp"

namespace lycoris {

namespace {

constexpr int kFormat = 1;
constexpr const char* kMetaKey = "lycoris_checkpoint";

using json = nlohmann::json;

// (name, tensor) of a module's parameters, then buffers.
std::vector<std::pair<std::string, torch::Tensor>> module_tensors(const NetworkModule& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : m.adapter->named_parameters(true)) out.emplace_back(m.name + "." + p.key(), p.value());
  for (const auto& b : m.adapter->named_buffers(true)) out.emplace_back(m.name + "." + b.key(), b.value());
  return out;
}

// (name, tensor) of every adapter tensor in network_structure order.
std::vector<std::pair<std::string, torch::Tensor>> adapter_tensors(const LycorisNetworkImpl& net) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& m : net.modules())
    for (auto& t : module_tensors(m)) out.push_back(std::move(t));
  return out;
}

std::string tensor_line(const std::string& name, const torch::Tensor& t) {
  return name + " " + io::dtype_name(io::from_torch(t.scalar_type())) + " " + shape_text(t.sizes().vec());
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

std::string optimizer_type(const torch::optim::Optimizer& o) { return c10::demangle(typeid(o).name()); }

// Per parameter group, per parameter: its network tensor name, or what it is when outside the network.
json optimizer_groups(const torch::optim::Optimizer& o, const LycorisNetworkImpl& net) {
  std::map<const void*, std::string> names;
  for (const auto& [name, t] : adapter_tensors(net)) names[t.unsafeGetTensorImpl()] = name;
  json groups = json::array();
  for (const auto& g : o.param_groups()) {
    json params = json::array();
    for (const auto& p : g.params()) {
      const auto it = names.find(p.unsafeGetTensorImpl());
      params.push_back(it != names.end() ? tensor_line(it->second, p) : tensor_line("(not in the network)", p));
    }
    groups.push_back(params);
  }
  return groups;
}

c10::List<torch::Tensor> generator_tensors(const detail::GeneratorStates& states, json& devices) {
  c10::List<torch::Tensor> out;
  devices = json::array();
  for (const auto& [device, state] : states) {
    devices.push_back(device.str());
    out.push_back(state);
  }
  return out;
}

}  // namespace

std::string network_structure(const LycorisNetworkImpl& net) {
  std::string out;
  for (const auto& m : net.modules()) {
    out += m.name + " " + m.algo + "\n";
    for (const auto& [name, t] : module_tensors(m)) out += tensor_line(name, t) + "\n";
  }
  return out;
}

std::string structure_difference(const std::string& a, const std::string& b, const std::string& a_name,
                                 const std::string& b_name) {
  const auto la = lines_of(a), lb = lines_of(b);
  for (size_t i = 0; i < std::max(la.size(), lb.size()); ++i) {
    const auto side = [&](const std::vector<std::string>& l, const std::string& name) {
      return i < l.size() ? name + " has '" + escape_control(l[i]) + "'" : name + " has nothing more";
    };
    if (i >= la.size() || i >= lb.size() || la[i] != lb[i])
      return "line " + std::to_string(i + 1) + ": " + side(la, a_name) + ", " + side(lb, b_name);
  }
  return "";
}

void save_checkpoint(const std::string& path, const LycorisNetworkImpl& net, const torch::optim::Optimizer& optimizer,
                     int64_t step, const std::string& extra) {
  json meta = {{"format", kFormat},
               {"lycoris_version", LYCORIS_VERSION},
               {"step", step},
               {"structure", network_structure(net)},
               {"multiplier", net.multiplier()},
               {"training", net.is_training()},
               {"applied", net.applied()},
               {"optimizer", {{"type", optimizer_type(optimizer)}, {"groups", optimizer_groups(optimizer, net)}}}};
  try {
    meta["extra"] = json::parse(extra);
  } catch (const json::exception& e) {
    throw OptionError("save_checkpoint " + path + ": extra is not JSON text: " + e.what());
  }
  json step_states = json::object();  // what on_step() drew besides tensors (DyLoRA's block count)
  for (const auto& m : net.modules())
    if (auto state = m.adapter->step_state(); !state.empty()) step_states[m.name] = state;
  meta["step_states"] = step_states;

  torch::serialize::OutputArchive archive;
  c10::List<torch::Tensor> tensors;
  for (const auto& [name, t] : adapter_tensors(net)) tensors.push_back(t.detach().to(torch::kCPU).clone());
  archive.write("tensors", tensors);
  c10::List<torch::Tensor> grads;
  json with_grad = json::array();
  const auto all = adapter_tensors(net);
  for (size_t i = 0; i < all.size(); ++i)
    if (all[i].second.grad().defined()) {
      with_grad.push_back(i);
      grads.push_back(all[i].second.grad().detach().to(torch::kCPU).clone());
    }
  archive.write("grads", grads);
  meta["grads"] = with_grad;
  json now_devices, refresh_devices;
  archive.write("rng_now", generator_tensors(detail::generator_states(net), now_devices));
  archive.write("rng_refresh", generator_tensors(net.rng_before_refresh(), refresh_devices));
  meta["rng"] = {{"now", now_devices}, {"refresh", refresh_devices}};
  archive.write(kMetaKey, meta.dump());
  torch::serialize::OutputArchive opt_archive;
  optimizer.save(opt_archive);
  archive.write("optimizer", opt_archive);
  torch::serialize::OutputArchive options_archive;
  std::vector<torch::serialize::OutputArchive> groups(optimizer.param_groups().size());
  for (size_t i = 0; i < groups.size(); ++i) {
    optimizer.param_groups()[i].options().serialize(groups[i]);
    options_archive.write(std::to_string(i), groups[i]);
  }
  archive.write("optimizer_options", options_archive);

  std::ostringstream bytes;
  archive.save_to(bytes);
  io::detail::write_atomically(path, bytes.str());
}

namespace {

// What load_checkpoint reads from a file, everything parsed before anything is restored.
struct LoadedCheckpoint {
  json meta;
  std::vector<torch::Tensor> tensors;
  std::map<size_t, torch::Tensor> grads;  // tensor index → its gradient
  detail::GeneratorStates rng_now, rng_refresh;
  torch::serialize::InputArchive optimizer;
  std::vector<torch::serialize::InputArchive> group_options;  // per parameter group
};

[[noreturn]] void damaged(const std::string& path, const std::string& why) {
  throw FormatError(path + ": not a readable lycoris training checkpoint (truncated or damaged?): " + why);
}

detail::GeneratorStates generator_states_of(const std::string& path, const c10::IValue& list, const json& devices) {
  if (!list.isTensorList() || !devices.is_array() || list.toTensorList().size() != devices.size())
    damaged(path, "the random generator states do not match their devices");
  detail::GeneratorStates out;
  const auto states = list.toTensorList();
  for (size_t i = 0; i < devices.size(); ++i)
    out.emplace_back(torch::Device(devices[i].get<std::string>()), states.get(i).to(torch::kCPU));
  return out;
}

LoadedCheckpoint read_checkpoint(const std::string& path, const torch::Device& device) {
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw IOError(path + ": cannot open: " + std::strerror(errno));
    char magic[4] = {};
    if (!in.read(magic, 4) || std::string(magic, 4) != std::string("PK\x03\x04", 4))
      throw FormatError(path + ": not a lycoris training checkpoint (save_checkpoint writes a torch archive, which "
                               "starts with a ZIP header)");
  }
  LoadedCheckpoint c;
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(path, device);
    c10::IValue meta, tensors, grads, now, refresh;
    if (!archive.try_read(kMetaKey, meta) || !meta.isString())
      throw FormatError(path + ": a torch archive, but not a lycoris training checkpoint (no '" + kMetaKey +
                        "' record)");
    c.meta = json::parse(meta.toStringRef());
    if (c.meta.value("format", 0) != kFormat)
      throw FormatError(path + ": checkpoint format " + c.meta.value("format", json()).dump() +
                        " is not the one this lycoris reads (" + std::to_string(kFormat) + ")");
    archive.read("tensors", tensors);
    archive.read("grads", grads);
    archive.read("rng_now", now);
    archive.read("rng_refresh", refresh);
    archive.read("optimizer", c.optimizer);
    torch::serialize::InputArchive options;
    archive.read("optimizer_options", options);
    c.group_options.resize(c.meta.at("optimizer").at("groups").size());
    for (size_t i = 0; i < c.group_options.size(); ++i) options.read(std::to_string(i), c.group_options[i]);
    if (!tensors.isTensorList()) damaged(path, "'tensors' is not a list of tensors");
    const auto list = tensors.toTensorList();
    for (size_t i = 0; i < list.size(); ++i) c.tensors.push_back(list.get(i));
    const json& with_grad = c.meta.at("grads");
    if (!grads.isTensorList() || grads.toTensorList().size() != with_grad.size())
      damaged(path, "the gradients do not match their list");
    for (size_t i = 0; i < with_grad.size(); ++i) c.grads[with_grad[i].get<size_t>()] = grads.toTensorList().get(i);
    c.rng_now = generator_states_of(path, now, c.meta.at("rng").at("now"));
    c.rng_refresh = generator_states_of(path, refresh, c.meta.at("rng").at("refresh"));
  } catch (const c10::Error& e) {
    std::string what = e.what_without_backtrace();
    if (const auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
    damaged(path, what);
  } catch (const json::exception& e) {
    damaged(path, e.what());
  }
  return c;
}

// KeyError / OptionError naming the first difference between the checkpoint and `net` / `optimizer`.
void check_fits(const std::string& path, const json& meta, const LycorisNetworkImpl& net,
                const torch::optim::Optimizer& optimizer) {
  const std::string diff =
      structure_difference(meta.at("structure").get<std::string>(), network_structure(net), "the checkpoint",
                           "the network");
  if (!diff.empty()) throw KeyError(path + ": the checkpoint is of another network structure: " + diff);
  const json& o = meta.at("optimizer");
  const std::string type = o.at("type").get<std::string>();
  if (type != optimizer_type(optimizer))
    throw OptionError(path + ": the checkpoint holds the state of a " + type + ", the optimizer is a " +
                      optimizer_type(optimizer));
  const json groups = optimizer_groups(optimizer, net);
  const json& saved = o.at("groups");
  if (saved.size() != groups.size())
    throw OptionError(path + ": the checkpoint's optimizer has " + std::to_string(saved.size()) +
                      " parameter group(s), this one " + std::to_string(groups.size()));
  for (size_t g = 0; g < groups.size(); ++g) {
    std::string a, b;
    for (const auto& p : saved[g]) a += p.get<std::string>() + "\n";
    for (const auto& p : groups[g]) b += p.get<std::string>() + "\n";
    const std::string d = structure_difference(a, b, "the checkpoint", "the optimizer");
    if (!d.empty()) throw OptionError(path + ": optimizer parameter group " + std::to_string(g) + ", " + d);
  }
  if (meta.at("applied").get<bool>() != net.applied())
    throw Error(path + ": the network was " + (net.applied() ? "not " : "") +
                "applied when the checkpoint was saved; " + (net.applied() ? "restore()" : "call apply_to()") +
                " before load_checkpoint");
}

// The saved states for the generators `net` draws from (CPU and its devices): each device's own, else the
// only saved one of its type (a process on cuda:0 saved, one on cuda:1 resumes).
detail::GeneratorStates used_here(const detail::GeneratorStates& saved, const LycorisNetworkImpl& net) {
  detail::GeneratorStates out;
  for (const auto& here : detail::generator_states(net)) {
    const torch::Device device = here.first;
    const torch::Tensor* same = nullptr;
    const torch::Tensor* same_type = nullptr;
    int of_type = 0;
    for (const auto& [d, state] : saved) {
      if (d == device) same = &state;
      if (d.type() == device.type() && ++of_type == 1) same_type = &state;
    }
    if (same)
      out.emplace_back(device, *same);
    else if (of_type == 1)
      out.emplace_back(device, *same_type);
  }
  return out;
}

// FormatError unless every saved state that load_checkpoint will set has the form of the generator's own.
void check_generator_states(const std::string& path, const detail::GeneratorStates& saved,
                            const LycorisNetworkImpl& net) {
  const auto current = detail::generator_states(net);
  for (const auto& [device, state] : used_here(saved, net))
    for (const auto& [d, own] : current)
      if (d == device && (state.scalar_type() != own.scalar_type() || state.sizes() != own.sizes()))
        damaged(path, "the random generator state of " + device.str() + " has the wrong form");
}

}  // namespace

Checkpoint load_checkpoint(const std::string& path, LycorisNetworkImpl& net, torch::optim::Optimizer& optimizer) {
  const auto params = net.parameters();
  auto c = read_checkpoint(path, params.empty() ? torch::Device(torch::kCPU) : params.front().device());
  Checkpoint out;
  bool training = false;
  double multiplier = 0;
  std::vector<std::pair<AdapterImpl*, std::vector<int64_t>>> step_states;
  try {
    check_fits(path, c.meta, net, optimizer);
    out.step = c.meta.at("step").get<int64_t>();
    out.extra = c.meta.at("extra").dump();
    training = c.meta.at("training").get<bool>();
    multiplier = c.meta.at("multiplier").get<double>();
    const auto& saved = c.meta.at("step_states");
    for (const auto& m : net.modules()) {
      auto& a = *m.adapter;
      const auto now = a.step_state();
      const auto state = saved.contains(m.name) ? saved.at(m.name).get<std::vector<int64_t>>() : std::vector<int64_t>{};
      if (now.empty() && state.empty()) continue;
      try {  // can the adapter take it? (set and put back: nothing changes before every check has passed)
        a.set_step_state(state);
        a.set_step_state(now);
      } catch (const Error& e) {
        damaged(path, m.name + ": per-step state: " + e.what());
      }
      step_states.emplace_back(&a, state);
    }
  } catch (const json::exception& e) {
    damaged(path, e.what());
  }
  const auto targets = adapter_tensors(net);
  if (c.tensors.size() != targets.size()) damaged(path, "the tensor count disagrees with its structure");
  for (size_t i = 0; i < targets.size(); ++i)
    if (c.tensors[i].scalar_type() != targets[i].second.scalar_type() ||
        c.tensors[i].sizes() != targets[i].second.sizes())
      damaged(path, "tensor '" + targets[i].first + "' disagrees with its structure");
  for (const auto& [i, g] : c.grads)
    if (i >= targets.size() || g.scalar_type() != targets[i].second.scalar_type() ||
        g.sizes() != targets[i].second.sizes())
      damaged(path, "a gradient disagrees with its tensor");
  check_generator_states(path, c.rng_now, net);
  check_generator_states(path, c.rng_refresh, net);
  try {
    optimizer.load(c.optimizer);
    for (size_t i = 0; i < c.group_options.size(); ++i)
      optimizer.param_groups()[i].options().serialize(c.group_options[i]);
  } catch (const c10::Error& e) {
    std::string what = e.what_without_backtrace();
    if (const auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
    damaged(path, "optimizer state: " + what);
  }

  // the mode and multiplier first: both refresh, and the refresh below is the one that counts
  if (net.is_training() != training) net.train(training);
  if (net.multiplier() != multiplier) net.set_multiplier(multiplier);
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < targets.size(); ++i) {
      const auto& t = targets[i].second;
      t.copy_(c.tensors[i]);
      const auto g = c.grads.find(i);
      if (g != c.grads.end())
        t.mutable_grad() = g->second.to(t.device()).clone();
      else if (t.grad().defined())
        t.mutable_grad() = torch::Tensor();
    }
  }
  for (const auto& [a, state] : step_states) a->set_step_state(state);
  // the bound weights as at saving: the same draws (dropouts) from the same generator states
  if (net.applied()) {
    detail::set_generator_states(used_here(c.rng_refresh, net));
    net.refresh();
  }
  detail::set_generator_states(used_here(c.rng_now, net));
  return out;
}

}  // namespace lycoris
