// One process of the distributed tests (tests/distributed/distributed_test.cpp starts several with torchrun's
// environment variables). Trains a small MLP with one adapter per algorithm on its shard of every global
// batch and saves the adapter parameters (PREFIX.<algo>.<rank>); with --single, the same training in one process
// without a group (the reference). Faults on request: --die-at / --hang-at STEP on --fault-rank.
//
//   dist_worker --out PREFIX [--algos lora,loha,…] [--steps N] [--single] [--accumulate K] [--write FILE]
//               [--mismatch-rank R] [--die-at S] [--hang-at S] [--fault-rank R]
//               [--ckpt PREFIX --ckpt-every K [--resume]]   (rank 0 saves PREFIX.<algo> every K steps; every rank
//                                                              resumes from it when it exists)
#include <signal.h>
#include <unistd.h>

#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "lycoris/checkpoint.hpp"
#include "lycoris/distributed.hpp"
#include "lycoris/modules/dylora.hpp"
#include "lycoris/network.hpp"

namespace {

namespace dist = lycoris::distributed;

constexpr int64_t kGlobalBatch = 12, kWidth = 16;

struct Args {
  std::string out, write, ckpt;
  std::vector<std::string> algos{"lora", "loha", "lokr", "dylora", "boft", "full"};
  int64_t steps = 4, accumulate = 1, ckpt_every = 0, mismatch_rank = -1, die_at = -1, hang_at = -1, fault_rank = 1;
  bool single = false, resume = false;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + k);
      return argv[++i];
    };
    if (k == "--out")
      a.out = next();
    else if (k == "--write")
      a.write = next();
    else if (k == "--steps")
      a.steps = std::stoll(next());
    else if (k == "--accumulate")
      a.accumulate = std::stoll(next());
    else if (k == "--mismatch-rank")
      a.mismatch_rank = std::stoll(next());
    else if (k == "--die-at")
      a.die_at = std::stoll(next());
    else if (k == "--hang-at")
      a.hang_at = std::stoll(next());
    else if (k == "--fault-rank")
      a.fault_rank = std::stoll(next());
    else if (k == "--ckpt")
      a.ckpt = next();
    else if (k == "--ckpt-every")
      a.ckpt_every = std::stoll(next());
    else if (k == "--resume")
      a.resume = true;
    else if (k == "--single")
      a.single = true;
    else if (k == "--algos") {
      a.algos.clear();
      std::stringstream ss(next());
      for (std::string s; std::getline(ss, s, ',');) a.algos.push_back(s);
    } else {
      throw std::runtime_error("unknown argument " + k);
    }
  }
  return a;
}

lycoris::NetworkOptions network_options(const std::string& algo, bool mismatch) {
  lycoris::NetworkOptions o;
  o.linear_dim(mismatch ? 2 : 4).linear_alpha(2).module(lycoris::AdapterOptions().algo(algo));
  if (algo == "lokr") o.module(lycoris::AdapterOptions().algo(algo).factor(-1));
  if (algo == "dylora") o.linear_dim(8).module(lycoris::AdapterOptions().algo(algo).block_size(2));
  if (algo == "boft") o.linear_dim(mismatch ? 8 : 16).linear_alpha(1);
  return o;
}

// Trains one algorithm; returns its adapter parameters after `steps` steps.
std::vector<torch::Tensor> train(const Args& a, const std::string& algo, const dist::ProcessGroupPtr& group) {
  const int64_t rank = group ? group->rank() : 0, world = group ? group->world_size() : 1;
  torch::manual_seed(0);  // the base model and the data: the same on every rank
  auto model = torch::nn::Sequential(torch::nn::Linear(kWidth, 32), torch::nn::Tanh(), torch::nn::Linear(32, 32),
                                     torch::nn::Tanh(), torch::nn::Linear(32, kWidth));
  auto x = torch::randn({a.steps, kGlobalBatch, kWidth}), y = torch::randn({a.steps, kGlobalBatch, kWidth});
  torch::manual_seed(100 + rank);  // adapters start different: DataParallel hands out rank 0's
  auto net = lycoris::create_lycoris(model, network_options(algo, rank == a.mismatch_rank));
  net->freeze_model();
  net->apply_to();
  std::unique_ptr<dist::DataParallel> ddp;
  if (group) ddp = std::make_unique<dist::DataParallel>(net, group, dist::DataParallelOptions().bucket_bytes(2048));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  const int64_t shard = kGlobalBatch / world, micro = shard / a.accumulate;
  const std::string ckpt = a.ckpt.empty() ? "" : a.ckpt + "." + algo;
  int64_t start = 0;
  if (a.resume && !ckpt.empty() && access(ckpt.c_str(), F_OK) == 0)
    start = lycoris::load_checkpoint(ckpt, *net, opt).step;  // every rank reads rank 0's file
  for (int64_t s = start; s < a.steps; ++s) {
    if (rank == a.fault_rank && s == a.die_at) ::raise(SIGKILL);
    if (rank == a.fault_rank && s == a.hang_at) ::raise(SIGSTOP);
    auto xs = x[s].narrow(0, rank * shard, shard), ys = y[s].narrow(0, rank * shard, shard);
    for (int64_t k = 0; k < a.accumulate; ++k) {
      auto loss = torch::mse_loss(model->forward(xs.narrow(0, k * micro, micro)), ys.narrow(0, k * micro, micro)) /
                  static_cast<double>(a.accumulate);
      if (ddp && k + 1 < a.accumulate) {
        auto scope = ddp->no_sync();
        loss.backward();
      } else {
        loss.backward();
      }
      if (k + 1 < a.accumulate) net->refresh();
    }
    if (ddp)
      ddp->step(opt);
    else
      net->step(opt);
    if (!ckpt.empty() && a.ckpt_every > 0 && (s + 1) % a.ckpt_every == 0) {
      auto save = [&] { lycoris::save_checkpoint(ckpt, *net, opt, s + 1); };
      group ? group->on_rank0(save, "saving " + ckpt) : save();
    }
  }
  if (group && !a.write.empty())
    group->on_rank0([&] { net->save_weights(a.write + "." + algo); }, "writing " + a.write);
  if (!a.write.empty() && access((a.write + "." + algo).c_str(), F_OK) != 0) {
    std::cerr << "rank " << rank << ": " << a.write << "." << algo << " is missing after on_rank0\n";
    std::exit(3);
  }
  std::vector<torch::Tensor> out;
  for (const auto& p : net->parameters()) out.push_back(p.detach().clone());
  for (const auto& m : net->modules())
    if (auto* d = dynamic_cast<lycoris::DyLoRAImpl*>(m.adapter.get())) out.push_back(torch::tensor(d->active_blocks()));
  if (ddp)
    std::cout << algo << ": " << ddp->buckets() << " buckets, " << ddp->stats().bytes << " bytes in "
              << ddp->stats().reductions << " reductions\n";
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rank = 0;
  try {
    const Args a = parse(argc, argv);
    torch::set_num_threads(1);
    dist::ProcessGroupPtr group;
    if (!a.single) group = dist::init_from_env();
    if (group) rank = group->rank();
    for (const auto& algo : a.algos) {
      const auto tensors = train(a, algo, group);
      if (!a.out.empty()) torch::save(tensors, a.out + "." + algo + "." + std::to_string(rank));
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "dist_worker rank " << rank << ": " << e.what() << "\n";
    return 1;
  }
}
