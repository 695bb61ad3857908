// `lycoris info`: on every golden adapter, every module gets the algorithm the reference created it with
// (manifest lycoris_class); malformed files give a non-zero exit and one stderr line naming the file.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace info_test {

using nlohmann::json;
using namespace lycoris;

using lycoris::test::run_cli;

namespace {

json manifest() {
  std::ifstream in(test::data_path("golden/manifest.json"));
  return json::parse(in);
}

// `info` followed by every golden adapter, in manifest order (all files in one call: one torch program start
// instead of 30).
std::vector<std::string> info_of_every_golden_adapter(const json& man) {
  std::vector<std::string> args{"info"};
  for (const auto& c : man["cases"])
    args.push_back(test::data_path("golden/" + c["name"].get<std::string>() + "/adapter.safetensors"));
  return args;
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
  // all files in one call: a JSON array in argument order
  auto args = info_of_every_golden_adapter(man);
  args.push_back("--json");
  auto r = run_cli(args);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.err, "");
  const auto all = json::parse(r.out);
  ASSERT_TRUE(all.is_array());
  ASSERT_EQ(all.size(), man["cases"].size());
  size_t index = 0;
  for (const auto& c : man["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    const std::string path = test::data_path("golden/" + name + "/adapter.safetensors");
    const auto& j = all[index++];
    EXPECT_EQ(j["file"], path);
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
  // all files in one call: one section per file, each starting with the file's path
  auto r = run_cli(info_of_every_golden_adapter(man));
  ASSERT_EQ(r.code, 0) << r.err;
  std::map<std::string, std::map<std::string, std::string>> sections;  // file → module → its table line
  {
    std::istringstream in(r.out);
    std::string line, file;
    bool in_modules = false;
    while (std::getline(in, line)) {
      if (line.size() > 12 && line.compare(line.size() - 12, 12, ".safetensors") == 0) {
        file = line;
        in_modules = false;
      }
      if (line.rfind("modules:", 0) == 0) in_modules = true;
      if (in_modules && line.rfind("lycoris_", 0) == 0) sections[file][line.substr(0, line.find(' '))] = line;
    }
  }
  EXPECT_EQ(sections.size(), man["cases"].size());
  for (const auto& c : man["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    auto& line_of = sections[test::data_path("golden/" + name + "/adapter.safetensors")];
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
  auto r = run_cli({"info", test::data_path("golden/lora/base.safetensors"), "--json"});
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
  auto r = run_cli({"info", dir + "/mixed.safetensors", "--json"});
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
  std::vector<std::string> args{"info"};
  std::vector<std::pair<std::string, std::string>> cases;  // path, expected message
  while (std::getline(in, line)) {
    auto tab = line.find('\t');
    const std::string file = line.substr(0, tab), expected = line.substr(tab + 1);
    if (expected == "OK" || file == "bool_bad_byte.safetensors") continue;  // data-level: info never reads it
    cases.emplace_back(test::data_path("malformed/" + file), expected);
    args.push_back(cases.back().first);
  }
  ASSERT_GE(cases.size(), 25u);
  // One file: non-zero exit, nothing on stdout, exactly one stderr line naming the file and the reason.
  for (size_t i : {size_t(0), cases.size() / 2, cases.size() - 1}) {
    auto r = run_cli({"info", cases[i].first});
    EXPECT_NE(r.code, 0) << cases[i].first;
    EXPECT_EQ(r.out, "") << cases[i].first;
    ASSERT_FALSE(r.err.empty()) << cases[i].first;
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << r.err;
    EXPECT_NE(r.err.find(cases[i].first), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(cases[i].second), std::string::npos) << r.err;
  }
  // Every file in one call: each gets its own line, in order, with its own reason; exit 1.
  auto r = run_cli(args);
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.out, "");
  std::istringstream err(r.err);
  for (const auto& [path, expected] : cases) {
    ASSERT_TRUE(std::getline(err, line)) << "no line for " << path;
    EXPECT_NE(line.find(path), std::string::npos) << line;
    EXPECT_NE(line.find(expected), std::string::npos) << line;
  }
  EXPECT_FALSE(std::getline(err, line)) << "extra line: " << line;
  r = run_cli({"info", "/nonexistent/x.safetensors"});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("/nonexistent/x.safetensors"), std::string::npos);
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1);
}

// A bad file among good ones: the good ones are still described, the bad one gets its line, exit 1.
TEST(Info, MixedGoodAndBadFiles) {
  const std::string good = test::data_path("golden/lora/adapter.safetensors");
  auto r = run_cli({"info", good, "/nonexistent/x.safetensors", good, "--json"});
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << r.err;
  EXPECT_NE(r.err.find("/nonexistent/x.safetensors"), std::string::npos) << r.err;
  auto j = json::parse(r.out);
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0]["file"], good);
  EXPECT_EQ(j[0]["modules"], j[1]["modules"]);
}

}  // namespace info_test
