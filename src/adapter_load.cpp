// Loading an adapter file against a base checkpoint: module name → base layer → LayerSpec → registry.
#include <torch/torch.h>

#include "exec/arena.hpp"
#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/text.hpp"
#include "module_fit.hpp"

namespace lycoris {

namespace {

constexpr size_t kListed = 10;  // items named in one message

// "<module>: <reason>" without repeating the module name when the reason already starts with it.
std::string problem(const std::string& module, const std::string& reason) {
  if (reason.compare(0, module.size(), module) == 0) return reason;
  return module + ": " + reason;
}

}  // namespace

LoadedAdapter load_adapter_for_base(const io::SafetensorsFile& file, const naming::Resolver& base_names,
                                    const std::map<std::string, std::vector<int64_t>>& base_shapes,
                                    const AdapterLoadOptions& options) {
  LoadedAdapter out;
  out.path = file.path();
  std::vector<std::string> fatal, skippable;
  // a base tensor no layer can be built from: the module does not fit it
  auto spec_for = [&](const naming::Resolution& target) {
    const auto& layer = target.layer;
    try {
      const auto shape = naming::layer_shape(layer, base_shapes.at(layer.weight_key));  // row block of a fused tensor
      const bool has_bias = !layer.bias_key.empty();
      return options.layer_spec ? options.layer_spec(layer, shape, has_bias) : LayerSpec::from_weight_shape(shape, has_bias);
    } catch (const Error& e) {
      throw ShapeError(std::string("base tensor ") + layer.weight_key + ": " + e.what());
    }
  };

  // every module's fp32 copies of its tensors in one populated block (page faults dominate loading on VMs)
  size_t arena_bytes = 0;
  for (const auto& t : file.header().tensors)
    arena_bytes += exec::OwnedFloatArena::bytes_for(t.numel(), t.dtype == io::DType::F64);
  exec::OwnedFloatArena arena(arena_bytes);
  std::vector<std::string> stray;
  const auto groups = group_modules(file, &stray);
  if (groups.empty()) throw KeyError(file.path() + ": " + no_modules_problem(file.tensors().size()));
  using Outcome = detail::ModuleFit::Outcome;
  for (const auto& [name, tensors] : groups) {
    const auto fit = detail::fit_module(base_names, name, name, tensors, spec_for);
    if (!fit.algo) {
      fatal.push_back(name + ": " + detail::no_algorithm_problem(tensors, 50));
      continue;
    }
    if (fit.outcome == Outcome::Unmatched) {
      auto near = base_names.closest(name, 3);
      skippable.push_back(name + ": matches no base tensor" + (near.empty() ? "" : " (closest: " + join(near, ", ", kListed) + ")"));
      continue;
    }
    if (fit.outcome == Outcome::Malformed) {
      fatal.push_back(problem(name, fit.malformed_error));
      continue;
    }
    if (fit.outcome == Outcome::Misfit) {
      skippable.push_back(problem(name, fit.misfit_error) + " (base " + fit.misfit->layer.weight_key + ")");
      continue;
    }
    if (fit.outcome == Outcome::Ambiguous) {
      std::vector<std::string> keys;
      for (const auto& f : fit.fits) keys.push_back(f.first->layer.weight_key);
      fatal.push_back(name + ": ambiguous, the name denotes several base layers (" + join(keys, ", ", kListed) + ")");
      continue;
    }
    AdapterModule m;
    m.name = name;
    m.algo = fit.algo->name;
    m.target = *fit.fits[0].first;
    m.layer = fit.fits[0].second->layer();
    m.adapter = fit.fits[0].second;
    m.adapter->eval();
    if (options.device != torch::Device(torch::kCPU)) m.adapter->to(options.device);
    out.modules.push_back(std::move(m));
  }

  if (!fatal.empty())
    throw KeyError(file.path() + ": " + std::to_string(fatal.size()) + " malformed module(s): " + join(fatal, "; ", kListed));
  if (!stray.empty()) {
    if (!options.allow_unmatched)
      throw KeyError(file.path() + ": " + stray_keys_problem(stray) + " (allow unmatched modules to skip them)");
    out.warnings.push_back(file.path() + ": skipped " + stray_keys_problem(stray));
  }
  if (!skippable.empty()) {
    if (!options.allow_unmatched)
      throw KeyError(file.path() + ": " + std::to_string(skippable.size()) +
                     " module(s) do not fit the base checkpoint (allow unmatched modules to skip them): " +
                     join(skippable, "; ", kListed));
    for (auto& s : skippable) out.warnings.push_back(file.path() + ": skipped " + s);
  }
  return out;
}

LoadedAdapter load_adapter_for_base(const std::string& adapter_path, const std::string& base_path,
                                    const AdapterLoadOptions& options) {
  auto base = io::SafetensorsFile::open(base_path);
  std::map<std::string, std::vector<int64_t>> shapes;
  std::vector<std::string> keys;
  for (const auto& t : base.tensors()) {
    shapes[t.name] = t.shape;
    keys.push_back(t.name);
  }
  return load_adapter_for_base(io::SafetensorsFile::open(adapter_path), naming::Resolver(keys), shapes, options);
}

}  // namespace lycoris
