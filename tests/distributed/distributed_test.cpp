// Data-parallel training over c10d (lycoris/distributed.hpp): several worker processes on loopback
// (tests/workers/dist_worker.cpp) against one process training on the whole global batch; faults, bad
// environments, a port in use, no-sync accumulation, rank-0 writing.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <optional>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "lycoris/distributed.hpp"
#include "test_util.hpp"

namespace distributed_test {

using namespace lycoris;
using namespace lycoris::test;
namespace dist = lycoris::distributed;

const std::vector<std::string> kAlgos{"lora", "loha", "lokr", "dylora", "boft", "full"};

struct RankRun {
  std::vector<CliResult> results;  // per rank
  double seconds = 0;
};

// Starts `world` workers with torchrun's variables and waits for all of them (each killed after
// `timeout_seconds`; the processes are killed and reaped even when this throws).
RankRun run_ranks(int world, const std::string& args, double dist_timeout = 30, double timeout_seconds = 90,
                  int stopped_rank = -1, const std::vector<std::string>& extra_env = {}, int port = 0) {
  if (port == 0) port = dist::free_loopback_port();
  std::vector<std::unique_ptr<CliProcess>> procs;
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < world; ++r) {
    CliOptions o;
    o.program = LYCORIS_DIST_WORKER;
    o.timeout_seconds = timeout_seconds;
    o.env = {"RANK=" + std::to_string(r),
             "LOCAL_RANK=" + std::to_string(r),
             "WORLD_SIZE=" + std::to_string(world),
             "LOCAL_WORLD_SIZE=" + std::to_string(world),
             "MASTER_ADDR=127.0.0.1",
             "MASTER_PORT=" + std::to_string(port),
             "LYCORIS_DIST_TIMEOUT=" + std::to_string(dist_timeout),
             "OMP_NUM_THREADS=1"};
    o.env.insert(o.env.end(), extra_env.begin(), extra_env.end());
    procs.push_back(std::make_unique<CliProcess>(with_words({}, args), o));
  }
  RankRun run;
  run.results.resize(procs.size());
  for (size_t r = 0; r < procs.size(); ++r)
    if (static_cast<int>(r) != stopped_rank) run.results[r] = procs[r]->wait();
  if (stopped_rank >= 0) {  // a stopped process: the others are done, end it
    procs[static_cast<size_t>(stopped_rank)]->send(SIGKILL);
    run.results[static_cast<size_t>(stopped_rank)] = procs[static_cast<size_t>(stopped_rank)]->wait();
  }
  run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return run;
}

CliResult run_single(const std::string& args) {
  CliOptions o;
  o.program = LYCORIS_DIST_WORKER;
  o.env = {"OMP_NUM_THREADS=1"};
  return CliProcess(with_words({"--single"}, args), o).wait();
}

std::vector<torch::Tensor> load(const std::string& prefix, const std::string& algo, int rank) {
  std::vector<torch::Tensor> ts;
  torch::load(ts, prefix + "." + algo + "." + std::to_string(rank));
  return ts;
}

std::string report(const RankRun& run) {
  std::string s;
  for (size_t r = 0; r < run.results.size(); ++r)
    s += "rank " + std::to_string(r) + ": code " + std::to_string(run.results[r].code) + " signal " +
         std::to_string(run.results[r].signal) + "\n" + run.results[r].out + run.results[r].err;
  return s;
}

// Every rank bit-identical to rank 0; rank 0 equal to the single process to 1e-5.
void expect_matches(const std::string& prefix, const std::string& single, int world,
                    const std::vector<std::string>& algos) {
  for (const auto& algo : algos) {
    const auto reference = load(single, algo, 0), first = load(prefix, algo, 0);
    ASSERT_EQ(reference.size(), first.size()) << algo;
    for (int r = 1; r < world; ++r) {
      const auto other = load(prefix, algo, r);
      ASSERT_EQ(other.size(), first.size()) << algo;
      for (size_t i = 0; i < first.size(); ++i)
        EXPECT_TRUE(torch::equal(other[i], first[i])) << algo << " tensor " << i << ": rank " << r << " differs";
    }
    for (size_t i = 0; i < first.size(); ++i)
      EXPECT_TRUE(all_close(first[i], reference[i], 1e-5, 0, algo + " tensor " + std::to_string(i)));
  }
}

TEST(Distributed, RanksAreBitIdenticalAndEqualOneProcessOnTheGlobalBatch) {
  const auto dir = temp_dir("dist");
  const auto single = run_single("--out " + dir + "/single");
  ASSERT_EQ(single.code, 0) << single.err;
  for (int world : {2, 3}) {
    const auto prefix = dir + "/w" + std::to_string(world);
    const auto run = run_ranks(world, "--out " + prefix + " --write " + prefix + "_rank0");
    for (const auto& r : run.results) ASSERT_EQ(r.code, 0) << report(run);
    // the adapters trained, then every rank ended with the same one, equal to the single process's
    expect_matches(prefix, dir + "/single", world, kAlgos);
    // rank 0 wrote the file (every rank saw it after on_rank0's barrier, or it exits 3)
    for (const auto& algo : kAlgos) EXPECT_FALSE(slurp(prefix + "_rank0." + algo).empty()) << algo;
  }
  // the training moved the adapters away from their start (otherwise equality says little)
  const auto start = run_single("--steps 0 --out " + dir + "/start");
  ASSERT_EQ(start.code, 0) << start.err;
  for (const auto& algo : kAlgos) {
    const auto a = load(dir + "/start", algo, 0), b = load(dir + "/single", algo, 0);
    double moved = 0;
    for (size_t i = 0; i < a.size(); ++i) moved = std::max(moved, (a[i] - b[i]).abs().max().item<double>());
    EXPECT_GT(moved, 1e-3) << algo;
  }
}

TEST(Distributed, NoSyncAccumulationAveragesOncePerStep) {
  const auto dir = temp_dir("dist_acc");
  const auto single = run_single("--algos lora,dylora --out " + dir + "/single");
  ASSERT_EQ(single.code, 0) << single.err;
  const auto run = run_ranks(2, "--algos lora,dylora --steps 4 --accumulate 3 --out " + dir + "/acc");
  for (const auto& r : run.results) ASSERT_EQ(r.code, 0) << report(run);
  expect_matches(dir + "/acc", dir + "/single", 2, {"lora", "dylora"});
  // 4 steps × 3 micro-steps: 4 reductions, not 12
  EXPECT_NE(run.results[0].out.find("lora: "), std::string::npos) << run.results[0].out;
  EXPECT_NE(run.results[0].out.find(" in 4 reductions"), std::string::npos) << run.results[0].out;
}

TEST(Distributed, KilledRankMakesTheOthersFailNamingOperationAndRank) {
  const auto run = run_ranks(3, "--algos lora --steps 4 --die-at 2 --fault-rank 2", 20, 60);
  EXPECT_EQ(run.results[2].signal, SIGKILL) << report(run);
  for (int r : {0, 1}) {
    const auto& res = run.results[r];
    EXPECT_FALSE(res.timed_out) << report(run);
    EXPECT_NE(res.code, 0) << report(run);
    EXPECT_NE(res.err.find("distributed: all-reduce of gradient bucket"), std::string::npos) << res.err;
    EXPECT_NE(res.err.find("failed on rank " + std::to_string(r) + " of 3"), std::string::npos) << res.err;
  }
  // the rank that survives longest (or both) names the dead one
  EXPECT_TRUE(run.results[0].err.find("rank 2 did not answer") != std::string::npos ||
              run.results[1].err.find("rank 2 did not answer") != std::string::npos)
      << report(run);
}

TEST(Distributed, HungRankMakesTheOthersFailWithinTheTimeout) {
  const auto run = run_ranks(2, "--algos lora --steps 4 --hang-at 1 --fault-rank 1", 2, 60, 1);
  const auto& res = run.results[0];
  EXPECT_FALSE(res.timed_out) << report(run);
  EXPECT_NE(res.code, 0) << report(run);
  EXPECT_NE(res.err.find("distributed: all-reduce of gradient bucket"), std::string::npos) << res.err;
  EXPECT_NE(res.err.find("rank 1 did not answer (dead or hung)"), std::string::npos) << res.err;
  EXPECT_EQ(run.results[1].signal, SIGKILL) << report(run);  // stopped until killed by us
}

TEST(Distributed, StructureMismatchNamesTheFirstDifference) {
  const auto run = run_ranks(2, "--algos lora --mismatch-rank 1", 20, 60);
  for (const auto& res : run.results) {
    EXPECT_EQ(res.code, 1) << report(run);
    EXPECT_NE(res.err.find("the adapter of rank 1 differs from rank 0's: line 2: "
                           "rank 0 has 'lycoris_0.lora_down F32 [4, 16]', rank 1 has 'lycoris_0.lora_down F32 [2, 16]'"),
              std::string::npos)
        << res.err;
  }
}

// A job killed mid-way (rank 1 dies at step 5; rank 0 wrote checkpoints after steps 2 and 4) and started
// again from rank 0's last checkpoint ends bit-identical to an uninterrupted run, on every rank.
TEST(Distributed, KilledJobResumedFromRank0sCheckpointIsBitIdentical) {
  const auto dir = temp_dir("dist_resume");
  const auto full = run_ranks(2, "--algos lora,dylora --steps 8 --out " + dir + "/full");
  for (const auto& r : full.results) ASSERT_EQ(r.code, 0) << report(full);
  for (const std::string algo : {"lora", "dylora"}) {
    const std::string job = "--algos " + algo + " --steps 8 --ckpt " + dir + "/ck --ckpt-every 2";
    const auto killed = run_ranks(2, job + " --die-at 5 --fault-rank 1", 20, 60);
    ASSERT_EQ(killed.results[1].signal, SIGKILL) << report(killed);
    ASSERT_NE(killed.results[0].code, 0) << report(killed);
    const auto resumed = run_ranks(2, job + " --resume --out " + dir + "/resumed");
    for (const auto& r : resumed.results) ASSERT_EQ(r.code, 0) << report(resumed);
    // the resumed job ran steps 4…7 only: 4 reductions
    EXPECT_NE(resumed.results[0].out.find(algo + ": "), std::string::npos) << resumed.results[0].out;
    EXPECT_NE(resumed.results[0].out.find(" in 4 reductions"), std::string::npos) << resumed.results[0].out;
    const auto reference = load(dir + "/full", algo, 0);
    for (int r = 0; r < 2; ++r) {
      const auto got = load(dir + "/resumed", algo, r);
      ASSERT_EQ(got.size(), reference.size());
      for (size_t i = 0; i < got.size(); ++i)
        EXPECT_TRUE(torch::equal(got[i], reference[i])) << algo << " rank " << r << " tensor " << i;
    }
  }
}

// Sets environment variables for the scope, restoring the previous values.
class ScopedEnv {
 public:
  explicit ScopedEnv(const std::map<std::string, std::optional<std::string>>& values) {
    for (const auto& [k, v] : values) {
      const char* old = std::getenv(k.c_str());
      saved_[k] = old ? std::optional<std::string>(old) : std::nullopt;
      v ? ::setenv(k.c_str(), v->c_str(), 1) : ::unsetenv(k.c_str());
    }
  }
  ~ScopedEnv() {
    for (const auto& [k, v] : saved_) v ? ::setenv(k.c_str(), v->c_str(), 1) : ::unsetenv(k.c_str());
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

std::string env_error(const std::map<std::string, std::optional<std::string>>& values) {
  std::map<std::string, std::optional<std::string>> all{{"RANK", std::nullopt},
                                                        {"WORLD_SIZE", std::nullopt},
                                                        {"LOCAL_RANK", std::nullopt},
                                                        {"LOCAL_WORLD_SIZE", std::nullopt},
                                                        {"MASTER_ADDR", std::nullopt},
                                                        {"MASTER_PORT", std::nullopt},
                                                        {"LYCORIS_DIST_TIMEOUT", std::nullopt},
                                                        {"TORCHELASTIC_USE_AGENT_STORE", std::nullopt},
                                                        {"TORCHELASTIC_RESTART_COUNT", std::nullopt}};
  for (const auto& [k, v] : values) all[k] = v;
  ScopedEnv env(all);
  try {
    dist::options_from_env();
  } catch (const OptionError& e) {
    return e.what();
  }
  return "";
}

TEST(Distributed, EnvironmentErrorsNameTheVariable) {
  EXPECT_NE(env_error({}).find("environment variable WORLD_SIZE is not set"), std::string::npos);
  EXPECT_NE(env_error({{"WORLD_SIZE", "2"}}).find("environment variable RANK is not set"), std::string::npos);
  EXPECT_NE(env_error({{"WORLD_SIZE", "2"}, {"RANK", "x1"}}).find("RANK='x1' is not a non-negative integer"),
            std::string::npos);
  EXPECT_NE(env_error({{"WORLD_SIZE", "2"}, {"RANK", "2"}}).find("RANK=2 is not below WORLD_SIZE=2"),
            std::string::npos);
  EXPECT_NE(env_error({{"WORLD_SIZE", "2"}, {"RANK", "1"}}).find("MASTER_ADDR is not set"), std::string::npos);
  EXPECT_NE(env_error({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_ADDR", "h"}}).find("MASTER_PORT is not set"),
            std::string::npos);
  EXPECT_NE(env_error({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}})
                .find("MASTER_PORT=70000 is not in 1…65535"),
            std::string::npos);
  EXPECT_NE(env_error({{"WORLD_SIZE", "4"},
                       {"RANK", "3"},
                       {"LOCAL_RANK", "2"},
                       {"LOCAL_WORLD_SIZE", "2"},
                       {"MASTER_ADDR", "h"},
                       {"MASTER_PORT", "1234"}})
                .find("LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
            std::string::npos);
  EXPECT_NE(env_error({{"WORLD_SIZE", "1"}, {"RANK", "0"}, {"LYCORIS_DIST_TIMEOUT", "soon"}})
                .find("LYCORIS_DIST_TIMEOUT='soon'"),
            std::string::npos);
  EXPECT_NE(env_error({{"WORLD_SIZE", "1"}, {"RANK", "0"}, {"TORCHELASTIC_USE_AGENT_STORE", "yes"}})
                .find("TORCHELASTIC_USE_AGENT_STORE='yes' is neither True nor False"),
            std::string::npos);
  EXPECT_NE(env_error({{"WORLD_SIZE", "1"}, {"RANK", "0"}, {"TORCHELASTIC_RESTART_COUNT", "-1"}})
                .find("TORCHELASTIC_RESTART_COUNT='-1' is not a non-negative integer"),
            std::string::npos);
  // a complete environment parses; one process needs no address
  EXPECT_EQ(env_error({{"WORLD_SIZE", "1"}, {"RANK", "0"}}), "");
  ScopedEnv env({{"WORLD_SIZE", "3"},
                 {"RANK", "2"},
                 {"LOCAL_RANK", "0"},
                 {"MASTER_ADDR", "node0"},
                 {"MASTER_PORT", "29511"},
                 {"LOCAL_WORLD_SIZE", std::nullopt},
                 {"LYCORIS_DIST_TIMEOUT", "7.5"},
                 {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                 {"TORCHELASTIC_RESTART_COUNT", "2"}});
  const auto o = dist::options_from_env();
  EXPECT_TRUE(o.launcher_store());
  EXPECT_EQ(o.restart_count(), 2);
  EXPECT_EQ(o.world_size(), 3);
  EXPECT_EQ(o.rank(), 2);
  EXPECT_EQ(o.local_rank(), 0);
  EXPECT_EQ(o.master_addr(), "node0");
  EXPECT_EQ(o.master_port(), 29511);
  EXPECT_EQ(o.timeout(), 7.5);
}

// torchrun's default (static) rendezvous: its agent serves the TCPStore on MASTER_PORT before the workers
// start, and says so with TORCHELASTIC_USE_AGENT_STORE=True. Rank 0 must connect to it, not serve it (that
// would be "port in use"), under the key prefix of the launcher's restart attempt.
TEST(Distributed, RanksJoinTheLaunchersStoreAsTorchrunsAgentServesIt) {
  const auto dir = temp_dir("dist_agent");
  const int port = dist::free_loopback_port();
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(port);
  so.isServer = true;
  so.waitWorkers = false;
  c10d::TCPStore agent("127.0.0.1", so);
  const auto run = run_ranks(2, "--algos lora --steps 3 --out " + dir + "/agent", 30, 90, -1,
                             {"TORCHELASTIC_USE_AGENT_STORE=True", "TORCHELASTIC_RESTART_COUNT=1"}, port);
  for (const auto& r : run.results) ASSERT_EQ(r.code, 0) << report(run);
  const auto a = load(dir + "/agent", "lora", 0), b = load(dir + "/agent", "lora", 1);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << "tensor " << i;
  // this attempt's ranks arrived under their own prefix
  c10d::PrefixStore attempt("/worker/attempt_1", c10::make_intrusive<c10d::TCPStore>("127.0.0.1", [&] {
                              auto c = so;
                              c.isServer = false;
                              return c;
                            }()));
  EXPECT_TRUE(attempt.check({"lycoris/arrived/0", "lycoris/arrived/1"}));
}

TEST(Distributed, PortInUseIsNamed) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int port = ntohs(addr.sin_port);
  try {
    dist::ProcessGroup group(dist::Options().world_size(2).rank(0).master_port(port).timeout(5));
    ADD_FAILURE() << "no error";
  } catch (const dist::DistributedError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("rank 0 cannot serve the rendezvous on 127.0.0.1:" + std::to_string(port) +
                        ": the port is already in use"),
              std::string::npos)
        << what;
  }
  ::close(fd);
}

// A group of one: DataParallel's hooks and buckets leave the training exactly as without a group.
TEST(Distributed, GroupOfOneTrainsExactlyLikeNoGroup) {
  auto train = [](bool grouped) {
    torch::manual_seed(0);
    auto model = torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::Tanh(), torch::nn::Linear(16, 8));
    auto x = torch::randn({3, 6, 8}), y = torch::randn({3, 6, 8});
    auto net =
        create_lycoris(model, NetworkOptions().linear_dim(4).module(AdapterOptions().algo("dylora").block_size(2)));
    net->freeze_model();
    net->apply_to();
    auto group = std::make_shared<dist::ProcessGroup>(dist::Options());
    std::unique_ptr<dist::DataParallel> ddp;
    if (grouped) ddp = std::make_unique<dist::DataParallel>(net, group, dist::DataParallelOptions().bucket_bytes(256));
    torch::optim::AdamW opt(net->parameters(), 1e-2);
    for (int64_t s = 0; s < 3; ++s) {
      torch::mse_loss(model->forward(x[s]), y[s]).backward();
      grouped ? ddp->step(opt) : net->step(opt);
    }
    if (ddp) {
      EXPECT_GT(ddp->buckets(), 1);
      EXPECT_EQ(ddp->stats().reductions, 3);
      EXPECT_EQ(ddp->stats().bytes, 3 * ddp->gradient_bytes());
    }
    return net->parameters();
  };
  const auto plain = train(false), grouped = train(true);
  ASSERT_EQ(plain.size(), grouped.size());
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_TRUE(torch::equal(plain[i], grouped[i])) << i;
}

TEST(Distributed, OnRank0CarriesRank0sErrorAndChecksOptions) {
  dist::ProcessGroup group{dist::Options()};
  EXPECT_EQ(group.backend(), "gloo");
  bool ran = false;
  group.on_rank0([&] { ran = true; }, "writing");
  EXPECT_TRUE(ran);
  try {
    group.on_rank0([] { throw IOError("out.safetensors: disk full"); }, "writing out.safetensors");
    ADD_FAILURE() << "no error";
  } catch (const dist::DistributedError& e) {
    EXPECT_STREQ(e.what(), "distributed: writing out.safetensors failed on rank 0: out.safetensors: disk full");
  }
  EXPECT_THROW(dist::ProcessGroup(dist::Options().world_size(2).rank(2)), OptionError);
  EXPECT_THROW(dist::ProcessGroup(dist::Options().backend("mpi")), OptionError);
}

}  // namespace distributed_test
