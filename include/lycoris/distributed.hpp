// Data-parallel adapter training on libtorch's distributed engine, c10d (docs/training.md#distributed).
// No networking of our own: ProcessGroupGloo on CPU, ProcessGroupNCCL when libtorch has CUDA, the TCPStore
// rendezvous and PyTorch's environment convention (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
// so `torchrun --no_python --nproc_per_node N program` (or Slurm / mpirun setting those) starts programs as is.
//
//   auto group = lycoris::distributed::init_from_env();      // one process of WORLD_SIZE
//   auto net = lycoris::create_lycoris(model, opts);  net->apply_to();
//   lycoris::distributed::DataParallel ddp(net, group);     // rank 0's adapter everywhere, structure checked
//   torch::optim::AdamW opt(net->parameters(), 1e-3);
//   for (...) {                                             // each rank: its shard of the global batch
//     model->forward(x_shard)...backward();                 // gradients averaged while backward runs
//     ddp.step(opt);                                        // optimizer step + the same DyLoRA draw everywhere
//   }
//   group->on_rank0([&] { net->save_weights("out.safetensors"); }, "save_weights");
//
// Every rank ends each step with bit-identical adapter parameters: the all-reduce hands every rank the same
// sum, and each rank then runs the same optimizer arithmetic on the same numbers.
#pragma once
#include <torch/optim/optimizer.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lycoris/error.hpp"
#include "lycoris/network.hpp"

namespace lycoris::distributed {

// A collective that failed or timed out, the rendezvous, or a rank whose adapter differs from rank 0's. The
// message names the operation, this rank, and the rank found missing when it could be told.
struct DistributedError : Error {
  using Error::Error;
};

struct Options {
  // "auto" (NCCL when this build has it and CUDA is available, else Gloo), "gloo" or "nccl"
  TORCH_ARG(std::string, backend) = "auto";
  TORCH_ARG(std::string, master_addr) = "127.0.0.1";  // rank 0's host: it serves the TCPStore rendezvous
  TORCH_ARG(int64_t, master_port) = 29500;
  TORCH_ARG(int64_t, rank) = 0;
  TORCH_ARG(int64_t, world_size) = 1;
  TORCH_ARG(int64_t, local_rank) = 0;  // the process's index on its machine: its GPU with NCCL
  // Seconds that every collective may take before the ranks give up with an error.
  TORCH_ARG(double, timeout) = 300;
  // Seconds that the ranks wait for each other to start (the rendezvous).
  TORCH_ARG(double, rendezvous_timeout) = 300;
  // The TCPStore at master_addr:master_port is served by the launcher, not by rank 0: torchrun's agent with
  // its default (static) rendezvous, which says so with TORCHELASTIC_USE_AGENT_STORE=True. Every rank then
  // connects as a client, and keeps its keys under the launcher's restart attempt (`restart_count`).
  TORCH_ARG(bool, launcher_store) = false;
  TORCH_ARG(int64_t, restart_count) = 0;
};

// True when the environment holds torchrun's variables (RANK or WORLD_SIZE is set).
bool launched_from_env();
// `defaults` overridden by RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE
// and TORCHELASTIC_RESTART_COUNT (and checked against LOCAL_WORLD_SIZE when set). OptionError naming the
// variable when one is missing, not a number, or inconsistent with the others (RANK ≥ WORLD_SIZE, ...). LYCORIS_DIST_TIMEOUT (seconds) sets the timeout of
// the collectives.
Options options_from_env(Options defaults = Options());

// One process of a group: the rendezvous (rank 0 listens on master_addr:master_port) and the collectives.
// Every rank calls the collectives in the same order; `what` names the operation in error messages.
class ProcessGroup {
 public:
  explicit ProcessGroup(Options options);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int64_t rank() const;
  int64_t world_size() const;
  int64_t local_rank() const;
  const Options& options() const;
  std::string backend() const;   // "gloo" or "nccl"
  torch::Device device() const;  // where collectives run: CPU for Gloo, cuda:local_rank for NCCL

  void broadcast(torch::Tensor& tensor, int64_t root, const std::string& what);
  void all_reduce_sum(torch::Tensor& tensor, const std::string& what);
  // Every rank's `tensor` (same shape and dtype on every rank), in rank order.
  std::vector<torch::Tensor> all_gather(const torch::Tensor& tensor, const std::string& what);
  // Rank 0's text on every rank.
  std::string broadcast_text(const std::string& text, const std::string& what);
  void barrier(const std::string& what = "barrier");
  // Runs `fn` on rank 0 only (writing files), then a barrier: afterwards every rank sees what rank 0 wrote.
  // When `fn` throws on rank 0, every rank throws a DistributedError carrying its message.
  void on_rank0(const std::function<void()>& fn, const std::string& what);

  struct Impl;  // the c10d objects (src/distributed/group_impl.hpp)
  Impl& impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};
using ProcessGroupPtr = std::shared_ptr<ProcessGroup>;

// ProcessGroup(options_from_env(defaults)).
ProcessGroupPtr init_from_env(Options defaults = Options());

// torchrun's single-machine launch without Python: starts `nproc` copies of this program (/proc/self/exe)
// with `args` (argv[0] first) and RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a
// free MASTER_PORT added to the environment (plus `env`, "NAME=value"), and waits for all of them. When one
// fails, the others are killed. Returns 0, or the first failure's exit status (128 + signal when killed).
int launch_local(int nproc, const std::vector<std::string>& args, const std::vector<std::string>& env = {});
// A loopback TCP port nobody listens on right now (bound to port 0, read back, released): a MASTER_PORT.
int free_loopback_port();

struct DataParallelOptions {
  // Capacity of one flattened gradient bucket. Buckets hold the parameters in reverse registration order
  // (about the order backward produces their gradients); each one's all-reduce starts as soon as its last
  // gradient is accumulated, while backward goes on. Smaller buckets overlap more, at more messages. The
  // default is PyTorch DDP's (25 MiB): with CPU ranks that each own one core, the all-reduces compete with
  // backward for that core, and fewer, larger ones measured faster (docs/training.md#distributed).
  TORCH_ARG(int64_t, bucket_bytes) = 25 * 1024 * 1024;
};

// What the gradient all-reduces cost since construction (or reset_stats()).
struct CommStats {
  int64_t reductions = 0;      // backward passes whose gradients were averaged
  int64_t bytes = 0;           // gradient bytes this rank all-reduced
  double exposed_seconds = 0;  // after backward: waiting for all-reduces not finished yet (not hidden)
};

// Makes a network data-parallel over `group` (the network's adapters stay where they are: the group's
// device). At construction every adapter parameter and buffer (and DyLoRA's block draw) is broadcast from
// rank 0, after checking that every rank has the same adapter structure (names, algorithms, tensor names,
// shapes and dtypes: a DistributedError naming the first difference otherwise). Then each backward averages
// the gradients of the adapter parameters (sum / world size) by bucketed all-reduces started from autograd
// hooks; only adapter parameters travel. Dropouts stay per rank, as in PyTorch's DDP.
class DataParallel {
 public:
  DataParallel(LycorisNetwork network, ProcessGroupPtr group, DataParallelOptions options = DataParallelOptions());
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // While alive, backward passes accumulate gradients locally (micro-steps of gradient accumulation); the
  // first backward after it averages the accumulated sum. Call network->refresh() before each micro-step's
  // forward (backward frees the graph of W').
  class NoSync {
   public:
    explicit NoSync(DataParallel& owner);
    ~NoSync();
    NoSync(const NoSync&) = delete;
    NoSync& operator=(const NoSync&) = delete;

   private:
    DataParallel& owner_;
  };
  NoSync no_sync() { return NoSync(*this); }

  // optimizer.step(), zero_grad(), then every adapter's on_step() with DyLoRA's block draw taken from rank 0,
  // then refresh(): LycorisNetworkImpl::step for a group.
  void step(torch::optim::Optimizer& optimizer);
  // Every adapter's on_step() with rank 0's draws, then refresh() (when not using step()).
  void on_step();
  // Broadcasts the adapter parameters and buffers and DyLoRA's active blocks from rank 0.
  void broadcast_from_rank0();

  // The adapter structure compared across ranks: lycoris::network_structure (checkpoint.hpp) and which
  // parameters train.
  std::string structure() const;
  const CommStats& stats() const;
  void reset_stats();
  int64_t buckets() const;
  int64_t gradient_bytes() const;  // bytes of the adapter gradients one reduction carries
  const LycorisNetwork& network() const { return network_; }
  const ProcessGroupPtr& group() const { return group_; }

  struct Reducer;  // the buckets and hooks (src/distributed/data_parallel.cpp)

 private:
  void check_structure_();
  void sync_step_states_();

  LycorisNetwork network_;
  ProcessGroupPtr group_;
  std::shared_ptr<Reducer> reducer_;
};

}  // namespace lycoris::distributed
