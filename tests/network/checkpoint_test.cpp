// Training checkpoints (docs/training.md#checkpoint-and-resume): a run killed mid-way (a child process ended by
// SIGKILL) and resumed from its last checkpoint by fresh objects ends with the same adapter, bit for bit, as
// an uninterrupted run, for algorithms with random draws (DyLoRA's block, dropouts) and optimizers with state
// (AdamW, SGD with momentum); what a checkpoint refuses (another structure or optimizer, a damaged file).
#include <ATen/CPUGeneratorImpl.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lycoris/checkpoint.hpp"
#include "lycoris/error.hpp"
#include "lycoris/network.hpp"
#include "test_util.hpp"

namespace checkpoint_test {

using namespace lycoris;

struct ToyImpl : torch::nn::Module {
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::LayerNorm ln{nullptr};
  ToyImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(6, 12));
    ln = register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({12})));
    fc2 = register_module("fc2", torch::nn::Linear(12, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::gelu(ln(fc1(x)))); }
};
TORCH_MODULE(Toy);

struct Case {
  std::string name;
  NetworkOptions options;
  std::string optimizer;  // "adamw" | "sgd"
};

std::vector<Case> cases() {
  const auto net = [](AdapterOptions m) { return NetworkOptions().linear_dim(4).linear_alpha(2).module(m); };
  return {
      {"lora_dropouts_adamw",
       net(AdapterOptions().algo("lora").dropout(0.2).rank_dropout(0.3).module_dropout(0.2)), "adamw"},
      {"dylora_sgd", net(AdapterOptions().algo("dylora").block_size(1)), "sgd"},
      {"dylora_adamw", net(AdapterOptions().algo("dylora").block_size(2)), "adamw"},
      {"loha_sgd", net(AdapterOptions().algo("loha").module_dropout(0.3)), "sgd"},
      {"lokr_adamw", net(AdapterOptions().algo("lokr").rank_dropout(0.25)), "adamw"},
      {"norm_full_sgd", net(AdapterOptions().algo("full").module_dropout(0.2)).train_norm(true), "sgd"},
  };
}

// One training job: the base model (seeded: every process builds the same), the network, the optimizer.
struct Job {
  Toy model{nullptr};
  LycorisNetwork net{nullptr};
  std::unique_ptr<torch::optim::Optimizer> opt;

  explicit Job(const Case& c, double lr_scale = 1.0) {
    torch::manual_seed(7);
    model = Toy();
    net = create_lycoris(model, c.options);
    net->freeze_model();
    net->apply_to();
    if (c.optimizer == "adamw")
      opt = std::make_unique<torch::optim::AdamW>(net->parameters(),
                                                  torch::optim::AdamWOptions(2e-2 * lr_scale).weight_decay(0.1));
    else
      opt = std::make_unique<torch::optim::SGD>(net->parameters(),
                                                torch::optim::SGDOptions(5e-2 * lr_scale).momentum(0.9).nesterov(true));
    // a new process's generator: whatever its seed, a resumed run must not depend on it
    torch::manual_seed(1000 + static_cast<int>(lr_scale * 10));
  }

  // Steps [from, to): the batch of step s comes from its own generator (a data loader at position s);
  // dropouts and DyLoRA's blocks draw from the global one. A checkpoint after every `every`-th step;
  // `kill_at`: SIGKILL in the middle of that step (after backward, before the optimizer).
  void train(int64_t from, int64_t to, const std::string& ckpt = "", int64_t every = 0, int64_t kill_at = -1) {
    for (int64_t s = from; s < to; ++s) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(100 + s));
      auto x = torch::randn({5, 6}, gen);
      auto target = torch::sin(x.sum(1, true) + torch::arange(4).to(torch::kFloat));
      auto loss = torch::mse_loss(model->forward(x), target);
      loss.backward();
      if (s == kill_at) ::raise(SIGKILL);
      net->step(*opt);
      if (every > 0 && (s + 1) % every == 0)
        save_checkpoint(ckpt, *net, *opt, s + 1, R"({"next_batch": )" + std::to_string(s + 1) + "}");
    }
  }
};

// Every adapter tensor bit-identical (torch::equal) to the reference's.
void expect_same_adapter(LycorisNetworkImpl& a, LycorisNetworkImpl& b, const std::string& what) {
  const auto pa = a.named_parameters(), pb = b.named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& p : pa) EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << what << ": " << p.key();
  for (const auto& t : a.named_buffers()) EXPECT_TRUE(torch::equal(t.value(), b.named_buffers()[t.key()])) << t.key();
}

constexpr int64_t kSteps = 12, kEvery = 4, kKillAt = 10;  // last checkpoint before the kill: step 8

// The child process of KilledAndResumed: trains case CHECKPOINT_TEST_CHILD from scratch, writing a
// checkpoint every kEvery steps to CHECKPOINT_TEST_PATH, and is killed during step kKillAt.
TEST(Checkpoint, ChildTrainer) {
  const char* which = std::getenv("CHECKPOINT_TEST_CHILD");
  if (!which) GTEST_SKIP() << "run by Checkpoint.KilledAndResumed";
  for (const auto& c : cases())
    if (c.name == which) {
      Job job(c);
      job.train(0, kSteps, std::getenv("CHECKPOINT_TEST_PATH"), kEvery, kKillAt);
    }
  FAIL() << "not killed: unknown case " << which;
}

// Runs this test binary as ChildTrainer for `c`; returns the signal that ended it (0: exited).
int run_killed_child(const Case& c, const std::string& path) {
  // everything the child needs is prepared before fork: between fork and exec only async-signal-safe calls
  std::vector<std::string> env{"CHECKPOINT_TEST_CHILD=" + c.name, "CHECKPOINT_TEST_PATH=" + path};
  for (char** e = environ; *e; ++e)  // not GoogleTest's sharding (CTest's shards): the child runs its one test
    if (std::string(*e).rfind("GTEST_", 0) != 0) env.emplace_back(*e);
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::string filter = "--gtest_filter=Checkpoint.ChildTrainer";
  char* argv[] = {const_cast<char*>("lycoris_tests"), filter.data(), nullptr};
  const pid_t pid = fork();
  if (pid == 0) {
    const int null = ::open("/dev/null", O_WRONLY);
    if (null >= 0) ::dup2(null, STDOUT_FILENO);  // gtest's report of the child is noise here
    ::execve("/proc/self/exe", argv, envp.data());
    _exit(127);
  }
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid) return -1;
  return WIFSIGNALED(status) ? WTERMSIG(status) : 0;
}

TEST(Checkpoint, KilledAndResumedEqualsUninterrupted) {
  for (const auto& c : cases()) {
    SCOPED_TRACE(c.name);
    Job reference(c);
    reference.train(0, kSteps);

    const std::string path = test::temp_dir("checkpoint_kill") + "/run.ckpt";
    ASSERT_EQ(run_killed_child(c, path), SIGKILL);
    Job resumed(c, 3.0);  // other learning rates: the checkpoint's options win
    const Checkpoint ck = load_checkpoint(path, *resumed.net, *resumed.opt);
    EXPECT_EQ(ck.step, 8);
    EXPECT_EQ(ck.extra, R"({"next_batch":8})");
    EXPECT_EQ(resumed.opt->param_groups()[0].options().get_lr(), reference.opt->param_groups()[0].options().get_lr());
    resumed.train(ck.step, kSteps);
    expect_same_adapter(*reference.net, *resumed.net, c.name);
  }
}

// The same in one process, resuming a run whose objects live on (the checkpoint must not depend on them),
// and checking that without the checkpoint's random state the runs would differ (the test can fail).
TEST(Checkpoint, ResumedInProcessEqualsUninterrupted) {
  for (const auto& c : cases()) {
    SCOPED_TRACE(c.name);
    const std::string path = test::temp_dir("checkpoint_inproc") + "/run.ckpt";
    Job reference(c);
    reference.train(0, kSteps, path, kEvery);  // checkpoints at 4, 8, 12; the last one kept
    Job interrupted(c);
    interrupted.train(0, 6, path, kEvery);  // the file now holds step 4
    interrupted.train(6, 7);                // progress lost by the "kill"

    Job resumed(c, 0.5);
    const Checkpoint ck = load_checkpoint(path, *resumed.net, *resumed.opt);
    ASSERT_EQ(ck.step, 4);
    resumed.train(ck.step, kSteps);
    expect_same_adapter(*reference.net, *resumed.net, c.name);
  }
}

TEST(Checkpoint, RandomStateMatters) {
  // without restoring the generators, a run with dropouts or DyLoRA draws diverges: the promise is not free
  for (const auto& c : cases()) {
    if (c.name != "lora_dropouts_adamw" && c.name != "dylora_sgd") continue;
    SCOPED_TRACE(c.name);
    const std::string path = test::temp_dir("checkpoint_rng") + "/run.ckpt";
    Job reference(c);
    reference.train(0, kSteps, path, kEvery);
    Job partial(c);
    partial.train(0, kEvery, path, kEvery);
    Job resumed(c);
    load_checkpoint(path, *resumed.net, *resumed.opt);
    torch::manual_seed(99);
    resumed.train(kEvery, kSteps);
    bool differs = false;
    for (const auto& p : reference.net->named_parameters())
      differs = differs || !torch::equal(p.value(), resumed.net->named_parameters()[p.key()]);
    EXPECT_TRUE(differs);
  }
}

TEST(Checkpoint, LoadRedrawsTheBoundWeightsOfTheNextStep) {
  // after a step, the bound W' of the next one holds fresh dropout masks (rank dropout: rows of ΔW zeroed,
  // module dropout: W' = W0); loading reproduces them exactly, which a refresh from another state does not
  const Case c = cases()[0];
  const std::string path = test::temp_dir("checkpoint_bound") + "/run.ckpt";
  Job reference(c);
  reference.train(0, kEvery, path, kEvery);
  Job resumed(c);
  load_checkpoint(path, *resumed.net, *resumed.opt);
  const auto fc1 = [](Job& j) { return j.model->fc1->weight; };
  const auto fc2 = [](Job& j) { return j.model->fc2->weight; };
  EXPECT_TRUE(torch::equal(fc1(resumed), fc1(reference)));
  EXPECT_TRUE(torch::equal(fc2(resumed), fc2(reference)));
  bool redrawn_differs = false;
  for (int seed = 0; seed < 4 && !redrawn_differs; ++seed) {
    torch::manual_seed(seed);
    resumed.net->refresh();
    redrawn_differs = !torch::equal(fc1(resumed), fc1(reference)) || !torch::equal(fc2(resumed), fc2(reference));
  }
  EXPECT_TRUE(redrawn_differs);
}

// ---------------------------------------------------------------- what load_checkpoint refuses

struct Saved {
  std::string dir, path;
  explicit Saved(const Case& c) : dir(test::temp_dir("checkpoint_err")), path(dir + "/run.ckpt") {
    Job job(c);
    job.train(0, 2, path, 2);
  }
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Checkpoint, OtherStructureIsNamed) {
  const Case lora = cases()[0];
  Saved saved(lora);
  Case smaller = lora;
  smaller.options.linear_dim(2);
  Job a(smaller);
  const auto before = a.net->named_parameters()["lycoris_fc1.lora_down"].clone();
  EXPECT_THROW(load_checkpoint(saved.path, *a.net, *a.opt), KeyError);
  const std::string e = error_of([&] { load_checkpoint(saved.path, *a.net, *a.opt); });
  EXPECT_NE(e.find(saved.path), std::string::npos) << e;
  EXPECT_NE(e.find("lycoris_fc1.lora_down F32 [4, 6]"), std::string::npos) << e;
  EXPECT_NE(e.find("lycoris_fc1.lora_down F32 [2, 6]"), std::string::npos) << e;
  EXPECT_TRUE(torch::equal(before, a.net->named_parameters()["lycoris_fc1.lora_down"]));  // nothing changed

  Case loha = lora;
  loha.options.module(AdapterOptions().algo("loha"));
  Job b(loha);
  const std::string e2 = error_of([&] { load_checkpoint(saved.path, *b.net, *b.opt); });
  EXPECT_NE(e2.find("'lycoris_fc1 lora'"), std::string::npos) << e2;
  EXPECT_NE(e2.find("'lycoris_fc1 loha'"), std::string::npos) << e2;
}

TEST(Checkpoint, OtherOptimizerIsNamed) {
  const Case c = cases()[0];  // AdamW
  Saved saved(c);
  Case sgd = c;
  sgd.optimizer = "sgd";
  Job job(sgd);
  const auto before = job.net->named_parameters()["lycoris_fc2.lora_up"].clone();
  const std::string e = error_of([&] { load_checkpoint(saved.path, *job.net, *job.opt); });
  EXPECT_NE(e.find("torch::optim::AdamW"), std::string::npos) << e;
  EXPECT_NE(e.find("torch::optim::SGD"), std::string::npos) << e;
  EXPECT_TRUE(torch::equal(before, job.net->named_parameters()["lycoris_fc2.lora_up"]));

  // same type, parameters in another order
  Job other(c);
  auto params = other.net->parameters();
  std::reverse(params.begin(), params.end());
  torch::optim::AdamW reversed(params);
  const std::string e2 = error_of([&] { load_checkpoint(saved.path, *other.net, reversed); });
  EXPECT_NE(e2.find("parameter group 0"), std::string::npos) << e2;
}

TEST(Checkpoint, DamagedFilesAreNamed) {
  const Case c = cases()[1];
  Saved saved(c);
  Job job(c);
  const std::string bytes = test::slurp(saved.path);
  ASSERT_GT(bytes.size(), 1000u);

  const std::string truncated = saved.dir + "/truncated.ckpt";
  std::ofstream(truncated, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  EXPECT_THROW(load_checkpoint(truncated, *job.net, *job.opt), FormatError);
  EXPECT_NE(error_of([&] { load_checkpoint(truncated, *job.net, *job.opt); }).find(truncated), std::string::npos);

  const std::string garbage = saved.dir + "/garbage.ckpt";
  std::ofstream(garbage, std::ios::binary) << std::string(4096, 'x');
  EXPECT_THROW(load_checkpoint(garbage, *job.net, *job.opt), FormatError);

  const std::string other = saved.dir + "/tensor.pt";
  torch::save(torch::ones({3}), other);  // a torch archive, not a checkpoint
  const std::string e = error_of([&] { load_checkpoint(other, *job.net, *job.opt); });
  EXPECT_NE(e.find("not a lycoris training checkpoint"), std::string::npos) << e;

  EXPECT_THROW(load_checkpoint(saved.dir + "/missing.ckpt", *job.net, *job.opt), IOError);
}

TEST(Checkpoint, SaveIsAtomicAndChecksExtra) {
  const Case c = cases()[0];
  Saved saved(c);
  const std::string before = test::slurp(saved.path);
  Job job(c);
  EXPECT_THROW(save_checkpoint(saved.path, *job.net, *job.opt, 3, "{not json"), OptionError);
  EXPECT_EQ(test::slurp(saved.path), before);                        // the old checkpoint intact
  EXPECT_EQ(test::listing(saved.dir), std::vector<std::string>{"run.ckpt"});  // no temporary left
  save_checkpoint(saved.path, *job.net, *job.opt, 3, R"({"epoch": 1, "files": ["a", "b"]})");
  Job other(c);
  const auto ck = load_checkpoint(saved.path, *other.net, *other.opt);
  EXPECT_EQ(ck.step, 3);
  EXPECT_EQ(ck.extra, R"({"epoch":1,"files":["a","b"]})");
}

TEST(Checkpoint, AppliedStateMustMatch) {
  const Case c = cases()[0];
  Saved saved(c);
  Job job(c);
  job.net->restore();
  const std::string e = error_of([&] { load_checkpoint(saved.path, *job.net, *job.opt); });
  EXPECT_NE(e.find("apply_to()"), std::string::npos) << e;
}

TEST(Checkpoint, StructureDifference) {
  EXPECT_EQ(structure_difference("a\nb\n", "a\nb\n", "x", "y"), "");
  EXPECT_EQ(structure_difference("a\nb\n", "a\nc\n", "x", "y"), "line 2: x has 'b', y has 'c'");
  EXPECT_EQ(structure_difference("a\n", "a\nc\n", "x", "y"), "line 2: x has nothing more, y has 'c'");
}

}  // namespace checkpoint_test
