// Module validation at load time for shapes that fit each other but make no adapter: a rank of 0 (empty
// low-rank factors) and a host layer with a zero-sized weight. Every loader rejects them with a
// lycoris::Error naming the module and the key, so that merge, resize and check report one clear line
// instead of a torch error from deep inside the math.
#include <algorithm>

#include "lycoris/algorithms.hpp"
#include "lycoris/error.hpp"
#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace load_validation_test {

using namespace lycoris;

const std::string kModule = "lycoris_blk";

torch::Tensor z(std::vector<int64_t> shape) { return torch::full(shape, 0.25); }

struct Case {
  std::string label, algo;  // algo "" = detected from the keys
  TensorMap tensors;
  LayerSpec layer;
  std::string key;  // the key the message must name
};

// The message of the lycoris::Error that loading throws ("" if it loads; a torch error fails the test).
std::string load_error(const Case& c) {
  try {
    if (c.algo.empty())
      load_adapter(kModule, c.tensors, c.layer);
    else
      find_algorithm(c.algo).load(kModule, c.tensors, c.layer);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::vector<Case> rank_zero_cases() {
  const auto lin = LayerSpec::linear(8, 8), conv = LayerSpec::conv(4, 8, {3, 3});
  return {
      {"lora", "", {{"lora_down.weight", z({0, 8})}, {"lora_up.weight", z({8, 0})}, {"alpha", z({})}}, lin,
       "lora_down.weight"},
      {"lora conv", "", {{"lora_down.weight", z({0, 4, 3, 3})}, {"lora_up.weight", z({8, 0, 1, 1})}}, conv,
       "lora_down.weight"},
      {"lora tucker", "",
       {{"lora_down.weight", z({0, 4, 1, 1})}, {"lora_mid.weight", z({0, 0, 3, 3})}, {"lora_up.weight", z({8, 0, 1, 1})}},
       conv, "lora_down.weight"},
      {"dylora", "dylora", {{"lora_down.weight", z({0, 8})}, {"lora_up.weight", z({8, 0})}}, lin, "lora_down.weight"},
      {"loha first pair", "",
       {{"hada_w1_a", z({8, 0})}, {"hada_w1_b", z({0, 8})}, {"hada_w2_a", z({8, 2})}, {"hada_w2_b", z({2, 8})}}, lin,
       "hada_w1_b"},
      {"loha second pair", "",
       {{"hada_w1_a", z({8, 2})}, {"hada_w1_b", z({2, 8})}, {"hada_w2_a", z({8, 0})}, {"hada_w2_b", z({0, 8})}}, lin,
       "hada_w2_b"},
      {"loha tucker", "",
       {{"hada_w1_a", z({0, 8})}, {"hada_w1_b", z({0, 4})}, {"hada_t1", z({0, 0, 3, 3})}, {"hada_w2_a", z({0, 8})},
        {"hada_w2_b", z({0, 4})}, {"hada_t2", z({0, 0, 3, 3})}},
       conv, "hada_w1_b"},
      {"lokr w2", "", {{"lokr_w1", z({2, 2})}, {"lokr_w2_a", z({4, 0})}, {"lokr_w2_b", z({0, 4})}}, lin, "lokr_w2_a"},
      {"lokr w1", "", {{"lokr_w1_a", z({2, 0})}, {"lokr_w1_b", z({0, 2})}, {"lokr_w2", z({4, 4})}}, lin, "lokr_w1_a"},
      {"lokr tucker", "",
       {{"lokr_w1", z({2, 2})}, {"lokr_w2_a", z({0, 4})}, {"lokr_w2_b", z({0, 2})}, {"lokr_t2", z({0, 0, 3, 3})}}, conv,
       "lokr_t2"},
      {"glora", "", {{"a1.weight", z({8, 0})}, {"a2.weight", z({0, 8})}, {"b1.weight", z({8, 0})}, {"b2.weight", z({0, 8})}},
       lin, "a2.weight"},
      {"glokr A", "",
       {{"glokr_a_w1", z({2, 2})}, {"glokr_a_w2_a", z({4, 0})}, {"glokr_a_w2_b", z({0, 4})}, {"glokr_b_w1", z({2, 2})},
        {"glokr_b_w2", z({4, 4})}},
       lin, "glokr_a_w2_a"},
      {"glokr B", "",
       {{"glokr_a_w1", z({2, 2})}, {"glokr_a_w2", z({4, 4})}, {"glokr_b_w1", z({2, 2})}, {"glokr_b_w2_a", z({4, 0})},
        {"glokr_b_w2_b", z({0, 4})}},
       lin, "glokr_b_w2_a"},
  };
}

TEST(LoadValidation, RankZeroIsRejectedNamingModuleAndKey) {
  for (const auto& c : rank_zero_cases()) {
    SCOPED_TRACE(c.label);
    const std::string msg = load_error(c);
    EXPECT_NE(msg.find(kModule), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.key), std::string::npos) << msg;
    EXPECT_NE(msg.find("rank 0"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

// Tensors that fit a layer with an empty weight exactly (so only the layer itself is wrong).
std::vector<Case> empty_layer_cases() {
  const auto no_out = LayerSpec::linear(8, 0), no_in = LayerSpec::linear(0, 8);
  const auto no_kernel = LayerSpec::conv(4, 8, {0, 3});
  return {
      {"lora no out", "", {{"lora_down.weight", z({2, 8})}, {"lora_up.weight", z({0, 2})}}, no_out, ""},
      {"lora no in", "", {{"lora_down.weight", z({2, 0})}, {"lora_up.weight", z({8, 2})}}, no_in, ""},
      {"lora no kernel", "", {{"lora_down.weight", z({2, 4, 0, 3})}, {"lora_up.weight", z({8, 2, 1, 1})}}, no_kernel, ""},
      {"loha", "", {{"hada_w1_a", z({0, 2})}, {"hada_w1_b", z({2, 8})}, {"hada_w2_a", z({0, 2})}, {"hada_w2_b", z({2, 8})}},
       no_out, ""},
      {"lokr", "", {{"lokr_w1", z({1, 2})}, {"lokr_w2", z({0, 4})}}, no_out, ""},
      {"full", "", {{"diff", z({0, 8})}}, no_out, ""},
      {"ia3", "", {{"weight", z({0})}, {"on_input", torch::tensor(0)}}, no_out, ""},
      {"diag-oft", "", {{"oft_blocks", z({0, 4, 4})}}, no_out, ""},
      {"glora", "", {{"a1.weight", z({0, 2})}, {"a2.weight", z({2, 0})}, {"b1.weight", z({8, 2})}, {"b2.weight", z({2, 0})}},
       no_in, ""},
      {"norm", "", {{"w_norm", z({0})}}, LayerSpec::layer_norm(0), ""},
  };
}

TEST(LoadValidation, LayerWithEmptyWeightIsAShapeError) {
  for (const auto& c : empty_layer_cases()) {
    SCOPED_TRACE(c.label);
    try {
      load_adapter(kModule, c.tensors, c.layer);
      ADD_FAILURE() << "loaded on " << c.layer.describe();
    } catch (const ShapeError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(kModule), std::string::npos) << msg;
      EXPECT_NE(msg.find("empty weight"), std::string::npos) << msg;
    }
  }
}

// ---------------------------------------------------------------- the same files through the CLI

using lycoris::test::run_cli;

// A non-zero exit and exactly one stderr line that names the module (no torch backtrace).
void expect_one_line_error(const test::CliResult& r, const std::string& what) {
  EXPECT_NE(r.code, 0) << what;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << what << ": " << r.err;
  EXPECT_EQ(r.err.rfind("lycoris: error: ", 0), 0u) << what << ": " << r.err;
  EXPECT_NE(r.err.find(kModule), std::string::npos) << what << ": " << r.err;
}

struct Files {
  std::string dir, base, adapter;
};

Files write_files(const std::string& tag, const torch::Tensor& base_weight, const torch::Tensor& down,
                  const torch::Tensor& up) {
  Files f;
  f.dir = test::temp_dir(tag);
  f.base = f.dir + "/base.safetensors";
  f.adapter = f.dir + "/adapter.safetensors";
  io::save_file(f.base, {{"blk.weight", base_weight}});
  io::save_file(f.adapter, {{kModule + ".alpha", torch::tensor(1.f)},
                            {kModule + ".lora_down.weight", down},
                            {kModule + ".lora_up.weight", up}});
  return f;
}

TEST(LoadValidation, CliRejectsRankZeroLora) {
  const auto f = write_files("rank0", z({8, 8}), z({0, 8}), z({8, 0}));
  const auto merge = run_cli({"merge", f.base, f.adapter, "-o", f.dir + "/out.safetensors"});
  expect_one_line_error(merge, "merge");
  EXPECT_NE(merge.err.find("rank 0"), std::string::npos) << merge.err;
  EXPECT_NE(merge.err.find(f.adapter), std::string::npos) << merge.err;
  const auto resize = run_cli({"resize", f.adapter, "-o", f.dir + "/r.safetensors", "--dim", "1"});
  expect_one_line_error(resize, "resize");
  EXPECT_NE(resize.err.find("rank 0"), std::string::npos) << resize.err;
  const auto check = run_cli({"check", f.adapter, "--base", f.base});
  EXPECT_EQ(check.code, 1) << check.out << check.err;  // problems found
  EXPECT_NE(check.out.find("MALFORMED  " + kModule), std::string::npos) << check.out;
  EXPECT_NE(check.out.find("rank 0"), std::string::npos) << check.out;
  EXPECT_EQ(check.err, "");
}

TEST(LoadValidation, CliRejectsLoraOnEmptyBaseWeight) {
  const auto f = write_files("empty-base", z({0, 8}), z({2, 8}), z({0, 2}));
  const auto merge = run_cli({"merge", f.base, f.adapter, "-o", f.dir + "/out.safetensors"});
  expect_one_line_error(merge, "merge");
  EXPECT_NE(merge.err.find("empty weight"), std::string::npos) << merge.err;
  const auto resize = run_cli({"resize", f.adapter, "-o", f.dir + "/r.safetensors", "--dim", "1"});
  expect_one_line_error(resize, "resize");
  const auto check = run_cli({"check", f.adapter, "--base", f.base});
  EXPECT_EQ(check.code, 1) << check.out << check.err;
  EXPECT_NE(check.out.find("SHAPE  " + kModule), std::string::npos) << check.out;
  EXPECT_NE(check.out.find("empty weight"), std::string::npos) << check.out;
  EXPECT_EQ(check.err, "");
}

}  // namespace load_validation_test
