// Adapter files seen as modules: keys "<module>.<suffix>" grouped by module (FORMAT.md §1).
#pragma once
#include <map>
#include <string>

#include "lycoris/adapter.hpp"
#include "lycoris/io/safetensors.hpp"

namespace lycoris {

// module name (text before the first '.') → {suffix (the rest) → tensor (zero-copy view of the file)}.
// Keys without a '.' belong to no module and are left out (the reference loaders ignore them).
std::map<std::string, TensorMap> group_modules(const io::SafetensorsFile& file);

}  // namespace lycoris
