// Places where two parts of the tools must say the same thing: the merge's progress and its tensors, the
// CLI's defaults and the library's, `check`'s loader notes and what the merge computes.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "lycoris/io/safetensors.hpp"
#include "lycoris/tools/check.hpp"
#include "lycoris/tools/merge.hpp"
#include "test_util.hpp"

namespace tools_agreement_test {

using Tensors = std::vector<std::pair<std::string, torch::Tensor>>;

TEST(ToolsAgreement, MergeProgressNamesEveryTensorInOrderOnBothPaths) {
  const auto dir = lycoris::test::temp_dir("agree-progress");
  Tensors base;
  for (int i = 0; i < 5; ++i) base.emplace_back("net.l" + std::to_string(i) + ".weight", torch::randn({8, 8}));
  lycoris::io::save_file(dir + "/base.safetensors", base);
  lycoris::io::save_file(dir + "/lora.safetensors", {{"lycoris_net_l1.lora_down.weight", torch::randn({2, 8})},
                                                     {"lycoris_net_l1.lora_up.weight", torch::randn({8, 2})}});
  for (bool convert : {false, true}) {  // same dtypes: the rewriter; --dtype: the buffer pool
    SCOPED_TRACE(convert ? "buffer pool" : "rewriter");
    lycoris::tools::MergeOptions o;
    o.adapters = {{dir + "/lora.safetensors", 1.0}};
    if (convert) o.dtype = torch::kFloat16;
    std::vector<std::pair<size_t, std::string>> seen;
    o.on_progress = [&](const lycoris::tools::MergeProgress& p) { seen.emplace_back(p.index, *p.key); };
    lycoris::tools::merge(dir + "/base.safetensors", dir + "/out.safetensors", o);
    ASSERT_EQ(seen.size(), base.size());
    for (size_t i = 0; i < seen.size(); ++i) {
      EXPECT_EQ(seen[i].first, i + 1);
      EXPECT_EQ(seen[i].second, base[i].first);
    }
  }
}

TEST(ToolsAgreement, CliBufferDefaultIsTheLibrarys) {
  auto r = lycoris::test::run_cli({"merge", "--help"});
  EXPECT_EQ(r.code, 0);
  const auto line_start = r.out.rfind('\n', r.out.find("--buffer-mb"));
  const auto line = r.out.substr(line_start + 1, r.out.find('\n', line_start + 1) - line_start - 1);
  const auto mib = lycoris::tools::MergeOptions().max_bytes_in_flight >> 20;
  EXPECT_NE(line.find("=" + std::to_string(mib) + " "), std::string::npos) << line;
}

// A LoRA module with an extraction sparse bias: the merge adds the dense residual (unscaled) to ΔW, and
// `check` says so (other loaders ignore it: a note per loader table, docs/loaders.md#matrix).
TEST(ToolsAgreement, SparseBiasIsMergedAndCheckSaysSo) {
  const auto dir = lycoris::test::temp_dir("agree-sparse");
  torch::manual_seed(1);
  const auto W = torch::randn({4, 6});
  const auto up = torch::randn({4, 2}), down = torch::randn({2, 6});
  lycoris::io::save_file(dir + "/base.safetensors", {{"net.proj.weight", W}});
  lycoris::io::save_file(
      dir + "/lora.safetensors",
      {{"lycoris_net_proj.lora_down.weight", down},
       {"lycoris_net_proj.lora_up.weight", up},
       {"lycoris_net_proj.alpha", torch::tensor(2.0f)},
       {"lycoris_net_proj.bias_indices", torch::tensor({0, 3, 1, 5}, torch::kInt16).reshape({2, 2})},
       {"lycoris_net_proj.bias_values", torch::tensor({0.5, -0.25}).to(torch::kHalf)},
       {"lycoris_net_proj.bias_size", torch::tensor({4, 6}, torch::kInt16)}});
  lycoris::tools::MergeOptions o;
  o.adapters = {{dir + "/lora.safetensors", 0.5}};
  lycoris::tools::merge(dir + "/base.safetensors", dir + "/out.safetensors", o);
  auto dense = torch::zeros({4, 6});
  dense[0][1] = 0.5;
  dense[3][5] = -0.25;
  const auto expected = W + 0.5 * (torch::mm(up, down) + dense);
  const auto merged = lycoris::io::SafetensorsFile::open(dir + "/out.safetensors").tensor("net.proj.weight");
  EXPECT_TRUE(lycoris::test::all_close(merged, expected, 1e-5, 1e-5, "merged"));

  const auto report = lycoris::tools::check(dir + "/lora.safetensors", dir + "/base.safetensors");
  bool noted = false;
  for (const auto& n : report.notes)
    if (n.topic == "ComfyUI: sparse bias") noted = n.text.find("the residual is missing") != std::string::npos;
  EXPECT_TRUE(noted) << report.text();
}

}  // namespace tools_agreement_test
