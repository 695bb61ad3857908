// `lycoris info model.pt` (cli/info_archive.hpp).
#include "info_archive.hpp"

#include <algorithm>
#include <iomanip>
#include <sstream>

#include "lycoris/error.hpp"
#include "lycoris/io/header.hpp"
#include "lycoris/jit.hpp"

namespace lycoris::cli {

namespace {

// "Conv2d(16, 16, k=3x3), stride 2, padding 1": the settings read from the module, where not the defaults.
std::string layer_text(const LayerSpec& s) {
  std::string out = s.describe();
  auto list = [](const std::vector<int64_t>& v) {
    std::string t;
    for (size_t i = 0; i < v.size(); ++i) t += (i ? "x" : "") + std::to_string(v[i]);
    return t;
  };
  auto all = [](const std::vector<int64_t>& v, int64_t x) {
    return std::all_of(v.begin(), v.end(), [x](int64_t i) { return i == x; });
  };
  if (s.is_conv()) {
    if (!all(s.stride, 1)) out += ", stride " + list(s.stride);
    if (!all(s.padding, 0)) out += ", padding " + list(s.padding);
    if (!all(s.dilation, 1)) out += ", dilation " + list(s.dilation);
    if (s.groups != 1) out += ", groups " + std::to_string(s.groups);
  }
  if (s.kind == LayerKind::GroupNorm) out += ", groups " + std::to_string(s.groups);
  if (s.is_norm()) {
    std::ostringstream eps;
    eps << s.eps;
    out += ", eps " + eps.str();
  }
  if (!s.has_bias) out += ", no bias";
  return out;
}

}  // namespace

void describe_archive(const std::string& path, bool as_json, std::vector<nlohmann::ordered_json>& objects,
                      std::ostream& os) {
  const auto module = torchscript::load(path);
  uint64_t tensors = 0, values = 0;
  for (const auto& p : module.named_parameters()) {
    ++tensors;
    values += static_cast<uint64_t>(p.value.numel());
  }
  struct Row {
    std::string path, type, text;
  };
  std::vector<Row> layers, skipped;
  std::string frozen;  // the error a network would give, when the module is frozen
  try {
    for (const auto& [p, node] : preorder(host_module(module))) {
      std::string why;
      if (const auto layer = node->layer(&why))
        layers.push_back({p, node->type_name(), layer_text(layer->spec())});
      else if (!why.empty())
        skipped.push_back({p, node->type_name(), why});
    }
  } catch (const Error& e) {
    frozen = e.what();
  }
  const std::string type = module.type()->name() ? module.type()->name()->name() : "";

  if (as_json) {
    nlohmann::ordered_json j;
    j["file"] = path;
    j["format"] = "torchscript";
    j["type"] = type;
    j["totals"] = {{"parameters", tensors}, {"values", values}};
    if (!frozen.empty()) j["frozen"] = frozen;
    j["layers"] = nlohmann::json::array();
    for (const auto& r : layers) j["layers"].push_back({{"path", r.path}, {"type", r.type}, {"layer", r.text}});
    j["skipped"] = nlohmann::json::array();
    for (const auto& r : skipped) j["skipped"].push_back({{"path", r.path}, {"type", r.type}, {"reason", r.text}});
    objects.push_back(std::move(j));
    return;
  }
  os << io::printable(path, 4096) << "\n";
  os << "TorchScript archive: " << type << "  parameters: " << tensors << " tensors, " << values << " values\n";
  if (!frozen.empty()) {
    os << frozen << "\n";
    return;
  }
  size_t width = 4;
  for (const auto& r : layers) width = std::max(width, r.path.size());
  os << "\nlayers a network adapts: " << layers.size() << "\n"
     << std::left << std::setw(static_cast<int>(width)) << "path" << "  " << std::setw(10) << "type" << "  layer\n";
  for (const auto& r : layers)
    os << std::left << std::setw(static_cast<int>(width)) << r.path << "  " << std::setw(10) << r.type << "  " << r.text
       << "\n";
  if (skipped.empty()) return;
  os << "\nskipped: " << skipped.size() << "\n";
  for (const auto& r : skipped) os << "  " << r.path << " (" << r.type << "): " << r.text << "\n";
}

}  // namespace lycoris::cli
