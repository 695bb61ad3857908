// File modules → the layers they adapt, for every loader (a network from weights, adapters against a base
// checkpoint, `check`): one policy, each caller words its own messages. Not installed.
#pragma once
#include <exception>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "lycoris/adapter.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/naming.hpp"

namespace lycoris::detail {

// How one file module fits the layers its name denotes.
struct ModuleFit {
  enum class Outcome {
    Unmatched,    // the name denotes no layer
    NoAlgorithm,  // no algorithm recognises the module's keys
    Malformed,    // the module itself is broken (missing or unknown key, bad scalar, …)
    Misfit,       // it fits none of its layers
    Ambiguous,    // it fits several
    Fits,         // it fits exactly one: fits.front()
  };
  Outcome outcome = Outcome::Unmatched;
  const Algorithm* algo = nullptr;                        // detected from the keys (nullptr: none)
  std::vector<const naming::Resolution*> candidates;      // the layers the name denotes, in resolver order
  std::vector<std::pair<const naming::Resolution*, AdapterPtr>> fits;  // the candidates it loads on
  const naming::Resolution* misfit = nullptr;             // the first candidate it does not fit
  std::string misfit_error;                               // and why (ShapeError / OptionError text)
  std::exception_ptr malformed;                           // the error of a malformed module
  std::string malformed_error;                            // its text
};

// The module `module` (tensors `tensors`) looked up as `lookup` in `names` and loaded on each candidate,
// whose LayerSpec `layer_of` gives. A ShapeError or OptionError (from layer_of or the loader) means the
// module does not fit that layer: the next candidate is tried. Any other lycoris::Error means the module
// itself is malformed and ends the search. Two or more fits mean the name is ambiguous. Other exceptions
// propagate. The algorithm is detected even when the name denotes no layer.
ModuleFit fit_module(const naming::Resolver& names, const std::string& lookup, const std::string& module,
                     const TensorMap& tensors, const std::function<LayerSpec(const naming::Resolution&)>& layer_of);

// "no known algorithm for keys {…}" naming at most `max_keys` of the module's keys.
std::string no_algorithm_problem(const TensorMap& tensors, size_t max_keys = SIZE_MAX);

}  // namespace lycoris::detail
