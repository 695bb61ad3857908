// Every golden .safetensors file reads with exactly the keys / shapes / dtypes the manifest lists, and
// the bytes agree with an independent raw reading (hand-rolled: ifstream + plain JSON parse of the header).
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lycoris/adapter_file.hpp"
#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace io_golden_test {

namespace fs = std::filesystem;
using nlohmann::json;
using namespace lycoris;

namespace {

json manifest() {
  std::ifstream in(test::data_path("golden/manifest.json"));
  return json::parse(in);
}

// Independent reader: the whole file, its header as plain JSON, data start.
struct Raw {
  std::string bytes;
  json header;
  size_t data_start = 0;
  explicit Raw(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
    header = json::parse(bytes.substr(8, n));
    data_start = 8 + n;
  }
};

// Compares every tensor of `path` read by SafetensorsFile with the raw reading.
void check_against_raw(const std::string& path) {
  SCOPED_TRACE(path);
  Raw raw(path);
  auto f = io::SafetensorsFile::open(path);
  size_t count = 0;
  for (const auto& [name, e] : raw.header.items()) {
    if (name == "__metadata__") {
      for (const auto& [k, v] : e.items()) EXPECT_EQ(f.metadata().at(k), v.get<std::string>());
      continue;
    }
    ++count;
    ASSERT_TRUE(f.contains(name)) << name;
    const auto& info = f.info(name);
    EXPECT_EQ(io::dtype_name(info.dtype), e["dtype"].get<std::string>()) << name;
    EXPECT_EQ(info.shape, e["shape"].get<std::vector<int64_t>>()) << name;
    auto t = f.tensor(name);
    EXPECT_EQ(t.sizes().vec(), info.shape) << name;
    EXPECT_EQ(t.scalar_type(), io::to_torch(info.dtype)) << name;
    uint64_t b = e["data_offsets"][0], end = e["data_offsets"][1];
    ASSERT_EQ(static_cast<uint64_t>(t.numel() * t.element_size()), end - b) << name;
    EXPECT_EQ(std::memcmp(t.contiguous().data_ptr(), raw.bytes.data() + raw.data_start + b, end - b), 0) << name;
  }
  EXPECT_EQ(f.tensors().size(), count);
}

std::vector<int64_t> shape_of(const json& spec) {
  return (spec.is_object() ? spec["shape"] : spec).get<std::vector<int64_t>>();
}

}  // namespace

TEST(IoGolden, EveryFileMatchesRawReading) {
  size_t files = 0;
  for (const auto& dir : fs::directory_iterator(test::data_path("golden"))) {
    if (!dir.is_directory()) continue;
    for (const auto& file : fs::directory_iterator(dir.path()))
      if (file.path().extension() == ".safetensors") {
        check_against_raw(file.path().string());
        ++files;
      }
  }
  EXPECT_GE(files, 150u);
}

TEST(IoGolden, AdapterKeysShapesAndDtypes) {
  const json man = manifest();
  ASSERT_EQ(man["cases"].size(), 30u);
  for (const auto& c : man["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    auto f = io::SafetensorsFile::open(test::data_path("golden/" + name + "/adapter.safetensors"));
    const std::string default_dtype = c["adapter_dtype"];
    size_t expected_tensors = 0;
    for (const auto& m : c["modules"]) {
      const std::string prefix = m["lycoris_name"].get<std::string>() + ".";
      for (const auto& [suffix, spec] : m["adapter_keys"].items()) {
        ++expected_tensors;
        const std::string key = prefix + suffix;
        ASSERT_TRUE(f.contains(key)) << key;
        EXPECT_EQ(f.info(key).shape, shape_of(spec)) << key;
        const std::string dtype = spec.is_object() ? spec["dtype"].get<std::string>() : default_dtype;
        EXPECT_EQ(io::dtype_name(f.info(key).dtype), dtype) << key;
      }
    }
    EXPECT_EQ(f.tensors().size(), expected_tensors);
    // group_modules: one group per wrapped module, suffix → tensor.
    auto groups = group_modules(f);
    EXPECT_EQ(groups.size(), c["modules"].size());
    for (const auto& m : c["modules"])
      EXPECT_EQ(groups.at(m["lycoris_name"].get<std::string>()).size(), m["adapter_keys"].size());
  }
}

TEST(IoGolden, BaseAndMergedShapesFromWeightShape) {
  const json man = manifest();
  ASSERT_EQ(man["cases"].size(), 30u);
  for (const auto& c : man["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    auto base = io::SafetensorsFile::open(test::data_path("golden/" + name + "/base.safetensors"));
    for (const auto& m : c["modules"]) {
      const std::string mod = m["module"];
      auto ws = m["weight_shape"].get<std::vector<int64_t>>();
      ASSERT_TRUE(base.contains(mod + ".weight")) << mod;
      EXPECT_EQ(base.info(mod + ".weight").shape, ws) << mod;
      EXPECT_EQ(base.info(mod + ".weight").dtype, io::DType::F32) << mod;
      if (m["bias"].get<bool>()) EXPECT_EQ(base.info(mod + ".bias").shape, std::vector<int64_t>{ws[0]}) << mod;
      else if (m["kind"] != "LayerNorm" && m["kind"] != "GroupNorm") EXPECT_FALSE(base.contains(mod + ".bias")) << mod;
    }
    for (const char* merged : {"merged_m1", "merged_m07"}) {
      auto mf = io::SafetensorsFile::open(test::data_path("golden/" + name + "/" + merged + ".safetensors"));
      ASSERT_EQ(mf.tensors().size(), base.tensors().size()) << merged;
      for (const auto& t : base.tensors()) EXPECT_EQ(mf.info(t.name).shape, t.shape) << merged << " " << t.name;
    }
  }
}

TEST(IoGolden, KnownValues) {
  // (IA)^3 on_input is an I64 flag: 1 only where the preset asked for train_on_input (ff.net.2).
  for (const char* c : {"ia3", "ia3_input"}) {
    auto f = io::SafetensorsFile::open(test::data_path(std::string("golden/") + c + "/adapter.safetensors"));
    for (const auto& info : f.tensors()) {
      if (info.name.size() < 9 || info.name.compare(info.name.size() - 9, 9, ".on_input") != 0) continue;
      auto v = f.tensor(info.name);
      EXPECT_EQ(v.scalar_type(), torch::kInt64);
      const bool on = std::string(c) == "ia3_input" && info.name.find("ff_net_2") != std::string::npos;
      EXPECT_EQ(v.item<int64_t>(), on ? 1 : 0) << c << " " << info.name;
    }
  }
  // alpha as created: lora linear_alpha=2, conv_alpha=1 for k>1 convs; F16 file: alpha 2 stored as F16.
  auto lora = io::SafetensorsFile::open(test::data_path("golden/lora/adapter.safetensors"));
  EXPECT_EQ(lora.tensor("lycoris_blocks_0_attn_to_q.alpha").item<float>(), 2.0f);
  EXPECT_EQ(lora.tensor("lycoris_down_0_conv1.alpha").item<float>(), 1.0f);
  auto fp16 = io::SafetensorsFile::open(test::data_path("golden/lora_scalar_fp16/adapter.safetensors"));
  auto a = fp16.tensor("lycoris_blocks_0_attn_to_q.alpha");
  EXPECT_EQ(a.scalar_type(), torch::kFloat16);
  EXPECT_EQ(a.item<float>(), 2.0f);
  EXPECT_EQ(fp16.metadata().at("oracle_case"), "lora_scalar_fp16");
}

}  // namespace io_golden_test
