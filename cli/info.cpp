// `lycoris info FILE [--json]`: tensors, metadata and totals of a safetensors file; for adapter files
// also the modules (keys grouped by the text before the first '.'), each module's algorithm detected
// from its key suffixes (docs/format.md#detection), rank and alpha, and a per-algorithm count.
// TorchScript archives (.pt): cli/info_archive.cpp.
#include <cmath>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.hpp"
#include "common.hpp"
#include "info_archive.hpp"
#include "lycoris/adapter_file.hpp"
#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/jit.hpp"
#include "lycoris/text.hpp"

namespace lycoris::cli {
namespace {

struct ModuleInfo {
  std::string name, algorithm = "unknown", error;
  int64_t rank = 0;
  double alpha = std::nan("");
  std::vector<std::string> keys;
};

std::vector<ModuleInfo> describe_modules(const io::SafetensorsFile& file) {
  std::vector<ModuleInfo> out;
  for (const auto& [name, tensors] : group_modules(file)) {
    ModuleInfo m;
    m.name = name;
    for (const auto& kv : tensors) m.keys.push_back(kv.first);
    if (const Algorithm* algo = detect_algorithm(tensors)) {
      m.algorithm = algo->name;
      try {
        if (algo->rank) m.rank = algo->rank(tensors);
        if (tensors.count("alpha")) m.alpha = functional::scalar_value(tensors.at("alpha"), name, "alpha");
      } catch (const Error& e) {
        m.error = e.what();
      }
    }
    out.push_back(std::move(m));
  }
  return out;
}


std::string alpha_text(double v) {
  if (std::isnan(v)) return "-";
  std::ostringstream os;
  os << std::setprecision(8) << v;
  return os.str();
}

// One file: its JSON object appended to `objects`, or its text section written to `os`.
void run_info(const std::string& path, bool as_json, std::vector<nlohmann::ordered_json>& objects,
              std::ostream& os) {
  if (torchscript::is_archive(path)) return describe_archive(path, as_json, objects, os);
  const auto file = io::SafetensorsFile::open(path);
  uint64_t params = 0, bytes = 0;
  for (const auto& t : file.tensors()) {
    params += t.numel();
    bytes += t.nbytes();
  }
  // an empty adapter (a network that adapted nothing, saved) is almost always a mistake: say so
  if (file.tensors().empty()) warn(path + ": the file has no tensors (an adapter with no module?)");
  auto modules = describe_modules(file);
  bool adapter = false;
  std::map<std::string, int> per_algo;
  for (const auto& m : modules) {
    adapter |= m.algorithm != "unknown";
    per_algo[m.algorithm]++;
  }

  if (as_json) {
    nlohmann::ordered_json j;
    j["file"] = path;
    j["tensors"] = nlohmann::json::array();
    for (const auto& t : file.tensors())
      j["tensors"].push_back({{"name", t.name}, {"dtype", io::dtype_name(t.dtype)}, {"shape", t.shape}});
    j["metadata"] = file.metadata();
    j["totals"] = {{"tensors", file.tensors().size()}, {"parameters", params}, {"bytes", bytes},
                   {"file_bytes", file.file_size()}};
    if (adapter) {
      j["modules"] = nlohmann::json::array();
      for (const auto& m : modules) {
        nlohmann::ordered_json e = {{"name", m.name}, {"algorithm", m.algorithm}, {"rank", m.rank}};
        e["alpha"] = std::isnan(m.alpha) ? nlohmann::json() : nlohmann::json(m.alpha);
        e["keys"] = m.keys;
        if (!m.error.empty()) e["error"] = m.error;
        j["modules"].push_back(e);
      }
      j["algorithms"] = per_algo;
    }
    objects.push_back(std::move(j));
    return;
  }

  os << io::printable(path, 4096) << "\n";
  os << "tensors: " << file.tensors().size() << "  parameters: " << params << "  bytes: " << bytes
     << "  (file " << file.file_size() << " bytes)\n";
  os << "metadata: " << file.metadata().size() << (file.metadata().empty() ? "\n" : " keys\n");
  for (const auto& [k, v] : file.metadata()) os << "  " << io::printable(k) << ": " << io::printable(v, 160) << "\n";
  size_t width = 4;
  for (const auto& t : file.tensors()) width = std::max(width, std::min<size_t>(io::printable(t.name).size(), 80));
  os << "\n" << std::left << std::setw(static_cast<int>(width)) << "name" << "  dtype    shape\n";
  for (const auto& t : file.tensors())
    os << std::left << std::setw(static_cast<int>(width)) << io::printable(t.name) << "  " << std::setw(7)
       << io::dtype_name(t.dtype) << "  " << shape_text(t.shape) << "\n";
  if (!adapter) return;
  size_t mwidth = 6;
  for (const auto& m : modules) mwidth = std::max(mwidth, std::min<size_t>(io::printable(m.name).size(), 80));
  os << "\nmodules: " << modules.size() << "\n"
     << std::left << std::setw(static_cast<int>(mwidth)) << "module" << "  algorithm  rank  alpha     keys\n";
  for (const auto& m : modules) {
    std::string keys;
    for (const auto& k : m.keys) keys += (keys.empty() ? "" : ", ") + io::printable(k);
    os << std::left << std::setw(static_cast<int>(mwidth)) << io::printable(m.name) << "  " << std::setw(9)
       << m.algorithm << "  " << std::setw(4) << (m.rank ? std::to_string(m.rank) : "-") << "  " << std::setw(8)
       << alpha_text(m.alpha) << "  " << keys << (m.error.empty() ? "" : "  [" + m.error + "]") << "\n";
  }
  os << "\nalgorithms:";
  for (const auto& [a, n] : per_algo) os << " " << a << "=" << n;
  os << "\n";
}

// Several files: each is described in turn (text sections separated by a blank line; with --json an
// array of the objects, one object alone for a single file); a file that cannot be read gets its one
// error line and the others go on; the exit status is 1 if any file failed.
void run_info_all(const std::vector<std::string>& paths, bool as_json) {
  std::vector<nlohmann::ordered_json> objects;
  int failed = 0, described = 0;
  for (size_t i = 0; i < paths.size(); ++i) {
    try {
      // the whole section is built before anything is printed: a failing file prints nothing
      std::ostringstream section;
      run_info(paths[i], as_json, objects, section);
      std::cout << (described++ && !as_json ? "\n" : "") << section.str();
    } catch (const std::exception& e) {
      if (paths.size() == 1) throw;
      std::cout << std::flush;
      print_error(e.what());
      ++failed;
    }
  }
  if (as_json && !objects.empty()) {
    const auto out = paths.size() == 1 ? objects.front() : nlohmann::ordered_json(objects);
    std::cout << out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  if (failed) throw ExitCode{1};
}

}  // namespace

void register_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "Show the tensors, metadata and adapter modules of .safetensors files (the layers of .pt TorchScript models)");
  auto paths = std::make_shared<std::vector<std::string>>();
  auto json = std::make_shared<bool>(false);
  cmd->add_option("FILE", *paths, "safetensors file(s) or TorchScript archives (.pt)")->required();
  cmd->add_flag("--json", *json, "machine-readable output (an array of objects for several files)");
  cmd->callback([paths, json] { run_info_all(*paths, *json); });
}

}  // namespace lycoris::cli
