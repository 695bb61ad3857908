// `lycoris info`: on every golden adapter, every module gets the algorithm the reference created it with
// (manifest lycoris_class); malformed files give a non-zero exit and one stderr line naming the file.
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace info_test {

using nlohmann::json;
using namespace lycoris;

namespace {

struct Run {
  int code;
  std::string out, err;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

Run run_cli(const std::string& args) {
  static const std::string dir = test::temp_dir("info");
  const std::string out = dir + "/out", err = dir + "/err";
  int status = std::system((std::string("'") + LYCORIS_CLI + "' " + args + " >'" + out + "' 2>'" + err + "'").c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err)};
}

json manifest() {
  std::ifstream in(test::data_path("golden/manifest.json"));
  return json::parse(in);
}

// Reference module class → the algorithm `info` must detect (DyLoRA files are plain LoRA files).
std::string algo_of(const std::string& cls) {
  static const std::map<std::string, std::string> m = {
      {"LoConModule", "lora"}, {"DyLoraModule", "lora"},  {"LohaModule", "loha"},
      {"LokrModule", "lokr"},  {"FullModule", "full"},    {"IA3Module", "ia3"},
      {"NormModule", "norm"},  {"GLoRAModule", "glora"}, {"DiagOFTModule", "diag-oft"},
      {"ButterflyOFTModule", "boft"}};
  return m.at(cls);
}

}  // namespace

TEST(Info, GoldenAdaptersJson) {
  const json man = manifest();
  ASSERT_EQ(man["cases"].size(), 30u);
  for (const auto& c : man["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    const std::string path = test::data_path("golden/" + name + "/adapter.safetensors");
    auto r = run_cli("info '" + path + "' --json");
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(r.err, "");
    auto j = json::parse(r.out);
    auto file = io::SafetensorsFile::open(path);
    std::map<std::string, json> modules;
    for (const auto& m : j["modules"]) modules[m["name"]] = m;
    ASSERT_EQ(modules.size(), c["modules"].size());
    std::map<std::string, int> counts;
    uint64_t params = 0;
    size_t tensors = 0;
    for (const auto& m : c["modules"]) {
      const std::string lname = m["lycoris_name"];
      ASSERT_TRUE(modules.count(lname)) << lname;
      const auto& got = modules[lname];
      const std::string algo = algo_of(m["lycoris_class"]);
      EXPECT_EQ(got["algorithm"], algo) << lname;
      counts[algo]++;
      const auto& keys = m["adapter_keys"];
      for (const auto& [suffix, spec] : keys.items()) {
        ++tensors;
        uint64_t n = 1;
        for (int64_t d : (spec.is_object() ? spec["shape"] : spec)) n *= d;
        params += n;
      }
      if (algo == "lora") EXPECT_EQ(got["rank"], keys["lora_down.weight"][0]) << lname;  // rank = rows of down
      if (keys.contains("alpha"))
        EXPECT_DOUBLE_EQ(got["alpha"].get<double>(), file.tensor(lname + ".alpha").to(torch::kFloat64).item<double>())
            << lname;
      else
        EXPECT_TRUE(got["alpha"].is_null()) << lname;
    }
    EXPECT_EQ((j["algorithms"].get<std::map<std::string, int>>()), counts);
    EXPECT_EQ(j["totals"]["tensors"], tensors);
    EXPECT_EQ(j["totals"]["parameters"], params);
    EXPECT_EQ(j["tensors"].size(), tensors);
    EXPECT_EQ(j["metadata"]["oracle_case"], name);
  }
}

TEST(Info, GoldenAdaptersText) {
  const json man = manifest();
  ASSERT_EQ(man["cases"].size(), 30u);
  for (const auto& c : man["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    auto r = run_cli("info '" + test::data_path("golden/" + name + "/adapter.safetensors") + "'");
    ASSERT_EQ(r.code, 0) << r.err;
    std::map<std::string, std::string> line_of;  // module → its line in the modules table
    std::istringstream in(r.out);
    std::string line;
    bool in_modules = false;
    while (std::getline(in, line)) {
      if (line.rfind("modules:", 0) == 0) in_modules = true;
      if (in_modules && line.rfind("lycoris_", 0) == 0) line_of[line.substr(0, line.find(' '))] = line;
    }
    for (const auto& m : c["modules"]) {
      const std::string lname = m["lycoris_name"];
      ASSERT_TRUE(line_of.count(lname)) << lname << "\n" << r.out;
      std::istringstream cols(line_of[lname]);
      std::string module, algo;
      cols >> module >> algo;
      EXPECT_EQ(algo, algo_of(m["lycoris_class"])) << line_of[lname];
    }
  }
}

TEST(Info, PlainModelFileHasNoModules) {
  auto r = run_cli("info '" + test::data_path("golden/lora/base.safetensors") + "' --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = json::parse(r.out);
  EXPECT_FALSE(j.contains("modules"));
  EXPECT_EQ(j["tensors"][0]["dtype"], "F32");
  EXPECT_GT(j["totals"]["parameters"].get<uint64_t>(), 0u);
}

TEST(Info, UnknownModulesListed) {
  auto dir = test::temp_dir("info-unknown");
  io::save_file(dir + "/mixed.safetensors", {{"lycoris_a.lora_up.weight", torch::zeros({4, 2})},
                                             {"lycoris_a.lora_down.weight", torch::zeros({2, 4})},
                                             {"lycoris_a.alpha", torch::tensor(1.0)},
                                             {"lycoris_b.something", torch::zeros({3})},
                                             {"nodot", torch::zeros({1})}});
  auto r = run_cli("info '" + dir + "/mixed.safetensors' --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = json::parse(r.out);
  ASSERT_EQ(j["modules"].size(), 2u);
  EXPECT_EQ(j["modules"][0]["name"], "lycoris_a");
  EXPECT_EQ(j["modules"][0]["algorithm"], "lora");
  EXPECT_EQ(j["modules"][0]["rank"], 2);
  EXPECT_EQ(j["modules"][0]["alpha"], 1.0);
  EXPECT_EQ(j["modules"][1]["algorithm"], "unknown");
  EXPECT_EQ(j["algorithms"]["unknown"], 1);
  EXPECT_EQ(j["totals"]["tensors"], 5);
}

TEST(Info, MalformedFilesOneStderrLine) {
  std::ifstream in(test::data_path("malformed/expected.tsv"));
  std::string line;
  size_t checked = 0;
  while (std::getline(in, line)) {
    auto tab = line.find('\t');
    const std::string file = line.substr(0, tab), expected = line.substr(tab + 1);
    if (expected == "OK" || file == "bool_bad_byte.safetensors") continue;  // data-level: info never reads it
    const std::string path = test::data_path("malformed/" + file);
    auto r = run_cli("info '" + path + "'");
    EXPECT_NE(r.code, 0) << file;
    EXPECT_EQ(r.out, "") << file;
    ASSERT_FALSE(r.err.empty()) << file;
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << file << ": " << r.err;  // exactly one line
    EXPECT_NE(r.err.find(path), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(expected), std::string::npos) << r.err;
    ++checked;
  }
  EXPECT_GE(checked, 25u);
  auto r = run_cli("info /nonexistent/x.safetensors");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("/nonexistent/x.safetensors"), std::string::npos);
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1);
}

}  // namespace info_test
