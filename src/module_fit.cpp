// File modules → the layers they adapt (module_fit.hpp).
#include "module_fit.hpp"

#include "lycoris/error.hpp"
#include "lycoris/text.hpp"

namespace lycoris::detail {

ModuleFit fit_module(const naming::Resolver& names, const std::string& lookup, const std::string& module,
                     const TensorMap& tensors, const std::function<LayerSpec(const naming::Resolution&)>& layer_of) {
  using Outcome = ModuleFit::Outcome;
  ModuleFit fit;
  fit.algo = detect_algorithm(tensors);
  fit.candidates = names.find(lookup);
  if (fit.candidates.empty()) return fit;  // Unmatched
  if (!fit.algo) {
    fit.outcome = Outcome::NoAlgorithm;
    return fit;
  }
  // Colliding paths (`a.b_c` / `a_b.c`) give one name to several layers: keep the ones the module fits.
  for (const auto* c : fit.candidates) {
    auto misfit = [&](const Error& e) {
      if (fit.misfit) return;
      fit.misfit = c;
      fit.misfit_error = e.what();
    };
    try {
      fit.fits.emplace_back(c, fit.algo->load(module, tensors, layer_of(*c)));
    } catch (const ShapeError& e) {
      misfit(e);
    } catch (const OptionError& e) {  // the algorithm cannot wrap this kind of layer
      misfit(e);
    } catch (const Error& e) {
      fit.malformed = std::current_exception();
      fit.malformed_error = e.what();
      fit.fits.clear();
      fit.outcome = Outcome::Malformed;
      return fit;
    }
  }
  fit.outcome = fit.fits.empty() ? Outcome::Misfit : fit.fits.size() > 1 ? Outcome::Ambiguous : Outcome::Fits;
  return fit;
}

std::string no_algorithm_problem(const TensorMap& tensors, size_t max_keys) {
  std::vector<std::string> keys;
  for (const auto& kv : tensors) keys.push_back(kv.first);
  return "no known algorithm for keys {" + join(keys, ", ", max_keys) + "}";
}

}  // namespace lycoris::detail
