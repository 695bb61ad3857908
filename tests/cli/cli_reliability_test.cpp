// The `lycoris` CLI under hostile input, careless use and signals, run as a real child process: no Inf
// written with exit 0, nothing left behind when interrupted, one clear stderr line and the right exit code
// for every bad input or option.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <torch/torch.h>

#include <csignal>
#include <cstring>
#include <fstream>
#include <filesystem>
#include <string>
#include <vector>

#include "lycoris/io/safetensors.hpp"
#include "test_util.hpp"

namespace cli_reliability_test {

namespace fs = std::filesystem;
using lycoris::test::CliOptions;
using lycoris::test::CliProcess;
using lycoris::test::CliResult;
using lycoris::test::count_lines;
using lycoris::test::listing;
using lycoris::test::run_cli;
using lycoris::test::slurp;
using Tensors = std::vector<std::pair<std::string, torch::Tensor>>;

// A LoRA module on base layer `layer` (dotted path): up [out, r] · down [r, in], alpha = r (scale 1).
void add_lora(Tensors& t, const std::string& layer, const torch::Tensor& up, const torch::Tensor& down) {
  std::string module = "lycoris_" + layer;
  for (auto& ch : module)
    if (ch == '.') ch = '_';
  t.emplace_back(module + ".lora_down.weight", down);
  t.emplace_back(module + ".lora_up.weight", up);
  t.emplace_back(module + ".alpha", torch::tensor(static_cast<float>(down.size(0))));
}

std::string write(const std::string& dir, const std::string& name, const Tensors& t) {
  const std::string path = dir + "/" + name;
  lycoris::io::save_file(path, t);
  return path;
}

// A small fp16 base (net.proj [8, 8], net.other [8, 8]) and a rank-2 LoRA on net.proj that fits fp16.
struct Files {
  std::string dir, base, lora;
  explicit Files(const std::string& tag, torch::ScalarType base_dtype = torch::kFloat16) : dir(lycoris::test::temp_dir(tag)) {
    torch::manual_seed(0);
    base = write(dir, "base.safetensors", {{"net.proj.weight", torch::randn({8, 8}).to(base_dtype)},
                                           {"net.other.weight", torch::randn({8, 8}).to(base_dtype)}});
    Tensors a;
    add_lora(a, "net.proj", torch::randn({8, 2}) * 0.1, torch::randn({2, 8}) * 0.1);
    lora = write(dir, "lora.safetensors", a);
  }
  std::string out() const { return dir + "/out.safetensors"; }
};

// One stderr line, naming everything in `names`.
::testing::AssertionResult one_line_naming(const CliResult& r, const std::vector<std::string>& names) {
  if (count_lines(r.err) != 1) return ::testing::AssertionFailure() << "stderr is not one line:\n" << r.err;
  for (const auto& n : names)
    if (r.err.find(n) == std::string::npos) return ::testing::AssertionFailure() << "stderr does not name '" << n << "': " << r.err;
  return ::testing::AssertionSuccess();
}

bool has_inf(const std::string& path) {
  auto f = lycoris::io::SafetensorsFile::open(path);
  for (const auto& name : f.names())
    if (!torch::isfinite(f.tensor(name).to(torch::kFloat32)).all().item<bool>()) return true;
  return false;
}

// ------------------------------------------------------------------------------ Inf in fp16 outputs

TEST(CliReliability, MergeAtHugeWeightIntoFp16IsAnErrorNamingTensorAndModule) {
  Files f("rel-w");
  for (const char* no_rewriter : {"LYCORIS_MERGE_NO_REWRITER=0", "LYCORIS_MERGE_NO_REWRITER=1"}) {
    CliOptions o;
    if (std::string(no_rewriter).back() == '1') o.env.push_back(no_rewriter);
    auto r = run_cli({"merge", f.base, f.lora, "-o", f.out(), "-w", "1e7", "--force"}, o);
    EXPECT_EQ(r.code, 1) << r.err;
    EXPECT_TRUE(one_line_naming(r, {"net.proj.weight", "lycoris_net_proj", "F16", "--dtype"}));
    EXPECT_FALSE(fs::exists(f.out()));
    EXPECT_EQ(listing(f.dir), (std::vector<std::string>{"base.safetensors", "lora.safetensors"}));
  }
  // the same values fit bf16 and fp32: merged, finite
  for (const char* dtype : {"bf16", "fp32"}) {
    auto r = run_cli({"merge", f.base, f.lora, "-o", f.out(), "-w", "1e7", "--force", "--dtype", dtype});
    EXPECT_EQ(r.code, 0) << r.err;
    EXPECT_FALSE(has_inf(f.out()));
  }
}

TEST(CliReliability, Fp16LoraWhoseProductOverflowsFp16) {
  Files f("rel-lora16");
  Tensors a;  // 2 · 300 · 300 = 180000 > 65504 on every element
  add_lora(a, "net.proj", torch::full({8, 2}, 300.0).to(torch::kHalf), torch::full({2, 8}, 300.0).to(torch::kHalf));
  const auto lora = write(f.dir, "big.safetensors", a);
  for (bool rewriter : {true, false}) {
    CliOptions o;
    if (!rewriter) o.env.push_back("LYCORIS_MERGE_NO_REWRITER=1");
    auto r = run_cli({"merge", f.base, lora, "-o", f.out()}, o);
    EXPECT_EQ(r.code, 1) << r.err;
    EXPECT_TRUE(one_line_naming(r, {"net.proj.weight", "lycoris_net_proj", "big.safetensors"}));
    EXPECT_FALSE(fs::exists(f.out()));
  }
  auto c = run_cli({"check", lora, "--base", f.base});
  EXPECT_EQ(c.code, 1) << c.out << c.err;
  EXPECT_NE(c.out.find("overflow"), std::string::npos) << c.out;
  // the reasonable LoRA stays clean
  c = run_cli({"check", f.lora, "--base", f.base});
  EXPECT_EQ(c.code, 0) << c.out << c.err;
}

TEST(CliReliability, DtypeConversionOfAnUntouchedTensorThatOverflows) {
  Files f("rel-conv", torch::kFloat32);
  auto base = write(f.dir, "big_base.safetensors",
                    {{"net.proj.weight", torch::randn({8, 8})}, {"net.other.weight", torch::full({8, 8}, 1e6)}});
  auto r = run_cli({"merge", base, f.lora, "-o", f.out(), "--dtype", "fp16"});
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_TRUE(one_line_naming(r, {"net.other.weight", "F16"}));
  EXPECT_FALSE(fs::exists(f.out()));
  r = run_cli({"merge", base, f.lora, "-o", f.out(), "--dtype", "bf16"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_FALSE(has_inf(f.out()));
}

// ------------------------------------------------------------------------------ signals and limits

// A merge paused after every tensor (test hook), with an old output that must survive the signal.
struct Interrupted {
  Files f{"rel-sig"};
  std::string old_bytes;
  Interrupted() {
    Tensors base, lora;
    for (int i = 0; i < 12; ++i) {
      base.emplace_back("net.l" + std::to_string(i) + ".weight", torch::randn({64, 64}).to(torch::kHalf));
      add_lora(lora, "net.l" + std::to_string(i), torch::randn({64, 2}) * 0.1, torch::randn({2, 64}) * 0.1);
    }
    f.base = write(f.dir, "base.safetensors", base);
    f.lora = write(f.dir, "lora.safetensors", lora);
    old_bytes = "an older output";
    std::ofstream(f.out()) << old_bytes;
  }
};

TEST(CliReliability, InterruptedMergeLeavesNoTemporaryAndTheOldOutput) {
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    for (const char* named : {"", "LYCORIS_NO_TMPFILE=1"}) {
      for (bool rewriter : {true, false}) {
        SCOPED_TRACE(std::string(strsignal(sig)) + " " + named + (rewriter ? " rewriter" : " buffer pool"));
        Interrupted t;
        CliOptions o;
        o.env = {"LYCORIS_MERGE_TEST_DELAY_MS=300"};
        if (*named) o.env.push_back(named);
        if (!rewriter) o.env.push_back("LYCORIS_MERGE_NO_REWRITER=1");
        CliProcess p({"merge", t.f.base, t.f.lora, "-o", t.f.out(), "--progress"}, o);
        ASSERT_TRUE(p.wait_for_stderr("2/12", 60)) << "the merge did not start";
        if (*named) {  // the named temporary exists now; it must not survive the signal
          bool seen = false;
          for (const auto& n : listing(t.f.dir)) seen = seen || n.find(".tmp-") != std::string::npos;
          EXPECT_TRUE(seen);
        }
        p.send(sig);
        auto r = p.wait();
        EXPECT_EQ(r.signal, sig) << r.err;
        EXPECT_EQ(listing(t.f.dir), (std::vector<std::string>{"base.safetensors", "lora.safetensors", "out.safetensors"}));
        EXPECT_EQ(slurp(t.f.out()), t.old_bytes);
      }
    }
  }
}

TEST(CliReliability, KilledMergeLeavesNothingNamed) {
  Interrupted t;
  CliOptions o;
  o.env = {"LYCORIS_MERGE_TEST_DELAY_MS=300"};
  CliProcess p({"merge", t.f.base, t.f.lora, "-o", t.f.out(), "--progress"}, o);
  ASSERT_TRUE(p.wait_for_stderr("2/12", 60));
  p.send(SIGKILL);
  auto r = p.wait();
  EXPECT_EQ(r.signal, SIGKILL);
  EXPECT_EQ(listing(t.f.dir), (std::vector<std::string>{"base.safetensors", "lora.safetensors", "out.safetensors"}));
  EXPECT_EQ(slurp(t.f.out()), t.old_bytes);
}

TEST(CliReliability, FileSizeLimitIsAnErrorNotASignal) {
  Interrupted t;
  fs::remove(t.f.out());
  for (const char* named : {"", "LYCORIS_NO_TMPFILE=1"}) {
    for (const char* args : {"", "--dtype"}) {
      CliOptions o;
      o.file_size_limit = 16 << 10;  // the output is ~100 KB
      if (*named) o.env.push_back(named);
      std::vector<std::string> argv{"merge", t.f.base, t.f.lora, "-o", t.f.out()};
      if (*args) argv.insert(argv.end(), {"--dtype", "fp32"});
      auto r = run_cli(argv, o);
      EXPECT_EQ(r.signal, 0);
      EXPECT_EQ(r.code, 1) << r.err;
      EXPECT_TRUE(one_line_naming(r, {t.f.out(), "File too large"}));
      EXPECT_EQ(listing(t.f.dir), (std::vector<std::string>{"base.safetensors", "lora.safetensors"}));
    }
  }
}

// ------------------------------------------------------------------------------ control characters

TEST(CliReliability, ControlCharactersFromFilesAreEscaped) {
  Files f("rel-ctl");
  Tensors a;  // a module name that would forge a line and clear the screen, matching nothing
  const std::string evil = "lycoris_evil\nlycoris: merged 1 adapter\x1b[2J\xc2\x9b";
  a.emplace_back(evil + ".lora_down.weight", torch::randn({2, 8}));
  a.emplace_back(evil + ".lora_up.weight", torch::randn({8, 2}));
  const auto lora = write(f.dir, "evil.safetensors", a);
  auto r = run_cli({"merge", f.base, lora, "-o", f.out()});
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(one_line_naming(r, {"lycoris_evil\\nlycoris: merged", "\\x1B[2J", "\\u009B"}));
  auto c = run_cli({"check", lora, "--base", f.base});
  EXPECT_EQ(c.code, 1);
  EXPECT_EQ(c.out.find('\x1b'), std::string::npos);
  EXPECT_EQ(c.out.find("\nlycoris: merged"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find("lycoris_evil\\nlycoris: merged"), std::string::npos) << c.out;
  r = run_cli({"merge", f.base, lora, "-o", f.out(), "--allow-unmatched"});  // as a warning
  EXPECT_EQ(r.err.find('\x1b'), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("lycoris_evil\\n"), std::string::npos) << r.err;
}

// ------------------------------------------------------------------------------ silently ignored input

TEST(CliReliability, KeysOutsideModulesAreNamed) {
  Files f("rel-stray");
  Tensors a;
  add_lora(a, "net.proj", torch::randn({8, 2}) * 0.1, torch::randn({2, 8}) * 0.1);
  a.emplace_back("stray_scale", torch::ones({1}));
  const auto lora = write(f.dir, "stray.safetensors", a);
  auto r = run_cli({"merge", f.base, lora, "-o", f.out()});
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(one_line_naming(r, {"stray.safetensors", "'stray_scale'", "outside any module"}));
  EXPECT_FALSE(fs::exists(f.out()));
  r = run_cli({"merge", f.base, lora, "-o", f.out(), "--allow-unmatched", "-q"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(one_line_naming(r, {"warning", "'stray_scale'"}));
  auto c = run_cli({"check", lora, "--base", f.base});
  EXPECT_EQ(c.code, 1);
  EXPECT_NE(c.out.find("'stray_scale'"), std::string::npos) << c.out;
  c = run_cli({"convert", lora, "--to", "kohya", "-o", f.dir + "/k.safetensors"});
  EXPECT_EQ(c.code, 1);
  EXPECT_TRUE(one_line_naming(c, {"'stray_scale'"}));
  EXPECT_FALSE(fs::exists(f.dir + "/k.safetensors"));
}

TEST(CliReliability, AnAdapterWithoutModulesIsAnError) {
  Files f("rel-empty");
  const auto none = write(f.dir, "none.safetensors", {});
  const auto flat = write(f.dir, "flat.safetensors", {{"scale", torch::ones({2})}});
  for (const auto& file : {none, flat}) {
    auto r = run_cli({"merge", f.base, file, "-o", f.out()});
    EXPECT_EQ(r.code, 1);
    EXPECT_TRUE(one_line_naming(r, {file, "nothing to apply"}));
    EXPECT_FALSE(fs::exists(f.out()));
    auto c = run_cli({"check", file, "--base", f.base});
    EXPECT_EQ(c.code, 1) << c.out;
    EXPECT_NE(c.out.find("nothing to apply"), std::string::npos) << c.out;
    EXPECT_EQ(c.out.find("clean"), std::string::npos) << c.out;
  }
}

// ------------------------------------------------------------------------------ options

TEST(CliReliability, WeightsMustBeFiniteNumbersOfSaneSize) {
  Files f("rel-weights", torch::kFloat32);
  for (const char* w : {"", "abc", "1.5x", " 1", "nan", "inf", "-inf", "1e39", "2e6", "-2e6"}) {
    auto r = run_cli({"merge", f.base, f.lora, "-o", f.out(), "-w", w});
    EXPECT_EQ(r.code, 2) << "-w '" << w << "': " << r.err;
    EXPECT_EQ(count_lines(r.err), 1u) << r.err;
    EXPECT_NE(r.err.find("-w"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(f.out()));
  }
  auto r = run_cli({"merge", f.base, f.lora, "-o", f.out(), "-w", "2e6"});
  EXPECT_NE(r.err.find("--force"), std::string::npos) << r.err;
  r = run_cli({"merge", f.base, f.lora, "-o", f.out(), "-w", "2e6", "--force"});
  EXPECT_EQ(r.code, 0) << r.err;
  r = run_cli({"merge", f.base, f.lora, "-o", f.out(), "-w", "-0.5"});
  EXPECT_EQ(r.code, 0) << r.err;
}

TEST(CliReliability, ThreadsAreClampedToTheMachine) {
  Files f("rel-threads");
  CliOptions o;
  o.timeout_seconds = 60;  // unclamped, 100000 threads never finished
  auto r = run_cli({"merge", f.base, f.lora, "-o", f.out(), "--threads", "100000", "-q"}, o);
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(one_line_naming(r, {"warning", "--threads 100000", "using"}));
}

TEST(CliReliability, UsageErrorsExit2WithOneLine) {
  Files f("rel-usage");
  const std::vector<std::vector<std::string>> cases = {
      {"merge", f.base, f.lora},                                  // no -o
      {"merge", f.base, f.lora, "-o", f.out(), "--no-such-flag"},  // unknown flag
      {"check", f.lora},                                          // no --base
      {"merge", f.base, f.lora, "-o", f.out(), "--dtype", "fp12"},
      {"frobnicate", f.base},                                     // unknown command
      {},                                                         // no command
  };
  for (const auto& args : cases) {
    auto r = run_cli(args);
    std::string shown;
    for (const auto& a : args) shown += a + " ";
    EXPECT_EQ(r.code, 2) << shown << ": " << r.err;
    EXPECT_EQ(count_lines(r.err), 1u) << shown << ": " << r.err;
  }
  auto r = run_cli({"frobnicate"});
  for (const char* c : {"info", "merge", "convert", "check", "extract", "resize"})
    EXPECT_NE(r.err.find(c), std::string::npos) << r.err;
  r = run_cli({"--version"});
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("libtorch"), std::string::npos) << r.out;
}

TEST(CliReliability, UnavailableDevicesAreOneLine) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "this build has CUDA";
  Files f("rel-device");
  for (const char* d : {"cuda", "cuda:99", "mps", "vulkan", "nonsense"}) {
    auto r = run_cli({"merge", f.base, f.lora, "-o", f.out(), "--device", d});
    EXPECT_EQ(r.code, 2) << d << ": " << r.err;
    EXPECT_EQ(count_lines(r.err), 1u) << d << ": " << r.err;
  }
  auto r = run_cli({"merge", f.base, f.lora, "-o", f.out(), "--device", "cuda"});
  EXPECT_NE(r.err.find("no CUDA"), std::string::npos) << r.err;
}

TEST(CliReliability, OutputThatIsADirectoryFailsBeforeTheWork) {
  Files f("rel-outdir");
  fs::create_directories(f.dir + "/outdir");
  for (bool rewriter : {true, false}) {
    CliOptions o;
    if (!rewriter) o.env.push_back("LYCORIS_MERGE_NO_REWRITER=1");
    auto r = run_cli({"merge", f.base, f.lora, "-o", f.dir + "/outdir"}, o);
    EXPECT_EQ(r.code, 1);
    EXPECT_TRUE(one_line_naming(r, {f.dir + "/outdir", "directory"}));
    EXPECT_TRUE(fs::is_directory(f.dir + "/outdir"));
    // before any work: the output is refused before an adapter is even opened
    r = run_cli({"merge", f.base, f.dir + "/missing.safetensors", "-o", f.dir + "/outdir"}, o);
    EXPECT_EQ(r.code, 1);
    EXPECT_TRUE(one_line_naming(r, {f.dir + "/outdir", "directory"}));
    r = run_cli({"merge", f.base, f.dir + "/missing.safetensors", "-o", f.dir + "/no/such/dir/out.safetensors"}, o);
    EXPECT_EQ(r.code, 1);
    EXPECT_TRUE(one_line_naming(r, {f.dir + "/no/such/dir"}));
  }
}

// An adapter file without tensors (a network that adapted nothing, saved) is never taken silently.
TEST(CliReliability, EmptyAdapterFileIsReported) {
  Files f("empty-adapter");
  const auto empty = write(f.dir, "empty.safetensors", {});
  auto info = run_cli({"info", empty});
  EXPECT_EQ(info.code, 0) << info.err;
  EXPECT_TRUE(one_line_naming(info, {empty, "no tensors"}));
  auto merge = run_cli({"merge", f.base, empty, "-o", f.out()});
  EXPECT_NE(merge.code, 0);
  EXPECT_TRUE(one_line_naming(merge, {empty}));
  EXPECT_FALSE(fs::exists(f.out()));
  auto check = run_cli({"check", empty, f.base});
  EXPECT_NE(check.code, 0) << check.out;
}

}  // namespace cli_reliability_test
