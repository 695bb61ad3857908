// Loading an adapter file against a base checkpoint: module name → base layer → LayerSpec → registry.
#include <torch/torch.h>

#include "exec/arena.hpp"
#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/text.hpp"

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
  auto spec_for = [&](const naming::BaseLayer& layer) {
    const auto shape = naming::layer_shape(layer, base_shapes.at(layer.weight_key));  // row block of a fused tensor
    const bool has_bias = !layer.bias_key.empty();
    return options.layer_spec ? options.layer_spec(layer, shape, has_bias) : LayerSpec::from_weight_shape(shape, has_bias);
  };

  // every module's fp32 copies of its tensors in one populated block (page faults dominate loading on VMs)
  size_t arena_bytes = 0;
  for (const auto& t : file.header().tensors)
    arena_bytes += exec::OwnedFloatArena::bytes_for(t.numel(), t.dtype == io::DType::F64);
  exec::OwnedFloatArena arena(arena_bytes);
  std::vector<std::string> stray;
  const auto groups = group_modules(file, &stray);
  if (groups.empty()) throw KeyError(file.path() + ": " + no_modules_problem(file.tensors().size()));
  for (const auto& [name, tensors] : groups) {
    const Algorithm* algo = detect_algorithm(tensors);
    if (!algo) {
      std::vector<std::string> keys;
      for (const auto& kv : tensors) keys.push_back(kv.first);
      fatal.push_back(name + ": no known algorithm for keys {" + join(keys, ", ", 50) + "}");
      continue;
    }
    auto candidates = base_names.find(name);
    if (candidates.empty()) {
      auto near = base_names.closest(name, 3);
      skippable.push_back(name + ": matches no base tensor" + (near.empty() ? "" : " (closest: " + join(near, ", ", kListed) + ")"));
      continue;
    }
    // Colliding paths (`a.b_c` / `a_b.c`) give one name to several layers: keep the ones the module fits.
    // ShapeError / OptionError = the module does not fit that layer (skippable); any other error = the
    // module itself is malformed (missing or unknown key, …).
    std::vector<std::pair<const naming::Resolution*, AdapterPtr>> fits;
    std::string shape_problem, malformed;
    for (const auto* c : candidates) {
      try {
        LayerSpec layer;
        try {
          layer = spec_for(c->layer);
        } catch (const Error& e) {
          throw ShapeError(std::string("base tensor ") + c->layer.weight_key + ": " + e.what());
        }
        fits.emplace_back(c, algo->load(name, tensors, layer));
      } catch (const ShapeError& e) {
        if (shape_problem.empty()) shape_problem = problem(name, e.what()) + " (base " + c->layer.weight_key + ")";
      } catch (const OptionError& e) {  // the algorithm cannot wrap this kind of layer
        if (shape_problem.empty()) shape_problem = problem(name, e.what()) + " (base " + c->layer.weight_key + ")";
      } catch (const Error& e) {
        malformed = problem(name, e.what());
        break;
      }
    }
    if (!malformed.empty()) {
      fatal.push_back(malformed);
      continue;
    }
    if (fits.empty()) {
      skippable.push_back(shape_problem);
      continue;
    }
    if (fits.size() > 1) {
      std::vector<std::string> keys;
      for (const auto& f : fits) keys.push_back(f.first->layer.weight_key);
      fatal.push_back(name + ": ambiguous, the name denotes several base layers (" + join(keys, ", ", kListed) + ")");
      continue;
    }
    AdapterModule m;
    m.name = name;
    m.algo = algo->name;
    m.target = *fits[0].first;
    m.layer = fits[0].second->layer();
    m.adapter = fits[0].second;
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
