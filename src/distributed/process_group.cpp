// lycoris::distributed::ProcessGroup: the environment convention, the TCPStore rendezvous, Gloo / NCCL
// (docs/training.md#distributed).
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LYCORIS_WITH_NCCL
#include <torch/cuda.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "distributed/group_impl.hpp"
#include "lycoris/text.hpp"

namespace lycoris::distributed {

namespace {

const char* const kEnvHint = " (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)";

// The integer value of environment variable `name`, or `fallback` when unset; OptionError when malformed.
int64_t env_integer(const char* name, int64_t fallback, bool required) {
  const char* text = std::getenv(name);
  if (!text) {
    if (required) throw OptionError(std::string("environment variable ") + name + " is not set" + kEnvHint);
    return fallback;
  }
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (!*text || *end || errno == ERANGE || v < 0)
    throw OptionError(std::string("environment variable ") + name + "='" + escape_control(text) +
                      "' is not a non-negative integer");
  return v;
}

bool is_loopback(const std::string& host) { return host == "localhost" || starts_with(host, "127."); }

void check_options(const Options& o) {
  if (o.world_size() < 1) throw OptionError("world size must be at least 1, got " + std::to_string(o.world_size()));
  if (o.rank() < 0 || o.rank() >= o.world_size())
    throw OptionError("rank " + std::to_string(o.rank()) + " is not below the world size " +
                      std::to_string(o.world_size()));
  if (o.master_port() < 1 || o.master_port() > 65535)
    throw OptionError("master port " + std::to_string(o.master_port()) + " is not in 1…65535");
  if (o.master_addr().empty()) throw OptionError("master address is empty");
  if (!(o.timeout() > 0) || !std::isfinite(o.timeout()))
    throw OptionError("timeout must be a positive number of seconds");
  if (!(o.rendezvous_timeout() > 0) || !std::isfinite(o.rendezvous_timeout()))
    throw OptionError("rendezvous timeout must be a positive number of seconds");
  if (o.backend() != "auto" && o.backend() != "gloo" && o.backend() != "nccl")
    throw OptionError("backend '" + o.backend() + "' is not one of auto, gloo, nccl");
}

std::string resolve_backend(const Options& o) {
#ifdef LYCORIS_WITH_NCCL
  if (o.backend() == "auto") return torch::cuda::is_available() ? "nccl" : "gloo";
  return o.backend();
#else
  if (o.backend() == "nccl")
    throw OptionError("backend nccl: this build of lycoris has no NCCL (its libtorch was built without CUDA)");
  return "gloo";
#endif
}

// Rank 0 serves the store; the others connect to it (retrying until the timeout, as torch does). A group of
// one needs no port: an in-process store.
c10::intrusive_ptr<c10d::Store> connect_store(const Options& o, std::chrono::milliseconds timeout) {
  if (o.world_size() == 1) return c10::make_intrusive<c10d::HashStore>();
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(o.master_port());
  so.isServer = o.rank() == 0 && !o.launcher_store();
  so.numWorkers = static_cast<size_t>(o.world_size());
  so.waitWorkers = false;  // the Gloo rendezvous waits for everyone, with a message
  so.timeout = timeout;
  const std::string where = o.master_addr() + ":" + std::to_string(o.master_port());
  try {
    auto store = c10::make_intrusive<c10d::TCPStore>(o.master_addr(), so);
    if (!o.launcher_store()) return store;
    // the launcher's store outlives a restart of the workers: each attempt keeps to its own keys (as torch)
    return c10::make_intrusive<c10d::PrefixStore>("/worker/attempt_" + std::to_string(o.restart_count()), store);
  } catch (const std::exception& e) {
    const std::string why = reason_of(e);
    if (o.launcher_store())
      throw DistributedError("distributed: rank " + std::to_string(o.rank()) +
                             " cannot reach the launcher's rendezvous store at " + where +
                             " (TORCHELASTIC_USE_AGENT_STORE=True): " + why);
    if (o.rank() == 0 && why.find("ddress already in use") != std::string::npos)
      throw DistributedError("distributed: rank 0 cannot serve the rendezvous on " + where +
                             ": the port is already in use (another job? set another MASTER_PORT)");
    if (o.rank() == 0)
      throw DistributedError("distributed: rank 0 cannot serve the rendezvous on " + where + ": " + why);
    throw DistributedError("distributed: rank " + std::to_string(o.rank()) +
                           " cannot reach the rendezvous of rank 0 at " + where + ": " + why);
  }
}

c10::intrusive_ptr<c10d::ProcessGroup> make_gloo(const Options& o, const c10::intrusive_ptr<c10d::Store>& store,
                                                 std::chrono::milliseconds timeout) {
  auto go = c10d::ProcessGroupGloo::Options::create(timeout);
  // GLOO_SOCKET_IFNAME picks the interface, as in torch; loopback jobs stay on loopback
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"))
    go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  else if (is_loopback(o.master_addr()))
    go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  else
    go->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  go->threads = 2;
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("lycoris/gloo", store);
  return c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, static_cast<int>(o.rank()),
                                                     static_cast<int>(o.world_size()), go);
}

std::chrono::milliseconds milliseconds(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(std::ceil(seconds * 1000)));
}

// Every rank checks in through the store and waits for the others (at most the rendezvous timeout), so that
// Gloo connects when all are there, within the collectives' timeout however late a rank started.
void wait_for_everyone(c10d::Store& store, const Options& o) {
  const std::string prefix = "lycoris/arrived/";
  store.set(prefix + std::to_string(o.rank()), std::vector<uint8_t>{1});
  std::vector<std::string> keys;
  for (int64_t r = 0; r < o.world_size(); ++r) keys.push_back(prefix + std::to_string(r));
  try {
    store.wait(keys, milliseconds(o.rendezvous_timeout()));
  } catch (const std::exception& e) {
    std::vector<std::string> missing;
    try {
      for (int64_t r = 0; r < o.world_size(); ++r)
        if (!store.check({keys[static_cast<size_t>(r)]})) missing.push_back(std::to_string(r));
    } catch (const std::exception&) {
      missing = {"0 (serving the store)"};
    }
    throw DistributedError("distributed: rank " + std::to_string(o.rank()) + " of " + std::to_string(o.world_size()) +
                           ": waiting for the other ranks at " + o.master_addr() + ":" +
                           std::to_string(o.master_port()) + " failed; not started: rank " + join(missing, ", ") +
                           " (" + reason_of(e) + ")");
  }
}

}  // namespace

std::string reason_of(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

bool launched_from_env() { return std::getenv("RANK") || std::getenv("WORLD_SIZE"); }

Options options_from_env(Options o) {
  o.world_size(env_integer("WORLD_SIZE", o.world_size(), true));
  o.rank(env_integer("RANK", o.rank(), true));
  if (o.world_size() < 1) throw OptionError("environment variable WORLD_SIZE must be at least 1");
  if (o.rank() >= o.world_size())
    throw OptionError("environment variable RANK=" + std::to_string(o.rank()) +
                      " is not below WORLD_SIZE=" + std::to_string(o.world_size()));
  o.local_rank(env_integer("LOCAL_RANK", o.rank(), false));
  const int64_t local_size = env_integer("LOCAL_WORLD_SIZE", 0, false);
  if (local_size && o.local_rank() >= local_size)
    throw OptionError("environment variable LOCAL_RANK=" + std::to_string(o.local_rank()) +
                      " is not below LOCAL_WORLD_SIZE=" + std::to_string(local_size));
  if (local_size > o.world_size())
    throw OptionError("environment variable LOCAL_WORLD_SIZE=" + std::to_string(local_size) +
                      " exceeds WORLD_SIZE=" + std::to_string(o.world_size()));
  const bool several = o.world_size() > 1;  // one process needs no rendezvous address
  if (const char* addr = std::getenv("MASTER_ADDR")) {
    if (!*addr) throw OptionError("environment variable MASTER_ADDR is empty");
    o.master_addr(addr);
  } else if (several) {
    throw OptionError(std::string("environment variable MASTER_ADDR is not set") + kEnvHint);
  }
  o.master_port(env_integer("MASTER_PORT", o.master_port(), several));
  if (o.master_port() < 1 || o.master_port() > 65535)
    throw OptionError("environment variable MASTER_PORT=" + std::to_string(o.master_port()) + " is not in 1…65535");
  if (const char* text = std::getenv("TORCHELASTIC_USE_AGENT_STORE")) {
    const std::string agent = text;
    if (agent != "True" && agent != "False")
      throw OptionError("environment variable TORCHELASTIC_USE_AGENT_STORE='" + escape_control(agent) +
                        "' is neither True nor False");
    o.launcher_store(agent == "True");
  }
  o.restart_count(env_integer("TORCHELASTIC_RESTART_COUNT", o.restart_count(), false));
  if (const char* t = std::getenv("LYCORIS_DIST_TIMEOUT")) {
    char* end = nullptr;
    const double s = std::strtod(t, &end);
    if (!*t || *end || !(s > 0) || !std::isfinite(s))
      throw OptionError("environment variable LYCORIS_DIST_TIMEOUT='" + escape_control(t) +
                        "' is not a positive number of seconds");
    o.timeout(s);
  }
  return o;
}

ProcessGroup::ProcessGroup(Options o) : impl_(std::make_unique<Impl>()) {
  check_options(o);
  auto& d = *impl_;
  d.options = o;
  d.backend = resolve_backend(o);
  d.timeout = milliseconds(o.timeout());
  d.store = connect_store(o, milliseconds(o.rendezvous_timeout()));
  if (o.world_size() > 1) wait_for_everyone(*d.store, o);
  try {
#ifdef LYCORIS_WITH_NCCL
    if (d.backend == "nccl") {
      d.device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(o.local_rank()));
      auto no = c10d::ProcessGroupNCCL::Options::create();
      no->timeout = d.timeout;
      auto prefixed = c10::make_intrusive<c10d::PrefixStore>("lycoris/nccl", d.store);
      d.group = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, static_cast<int>(o.rank()),
                                                            static_cast<int>(o.world_size()), no);
    }
#endif
    if (!d.group) d.group = make_gloo(o, d.store, d.timeout);
  } catch (const std::exception& e) {
    throw DistributedError("distributed: rank " + std::to_string(o.rank()) + " of " + std::to_string(o.world_size()) +
                           ": connecting the " + d.backend + " group through " + o.master_addr() + ":" +
                           std::to_string(o.master_port()) + " failed (did every rank start?): " + reason_of(e));
  }
}

ProcessGroup::~ProcessGroup() = default;

int64_t ProcessGroup::rank() const { return impl_->options.rank(); }
int64_t ProcessGroup::world_size() const { return impl_->options.world_size(); }
int64_t ProcessGroup::local_rank() const { return impl_->options.local_rank(); }
const Options& ProcessGroup::options() const { return impl_->options; }
std::string ProcessGroup::backend() const { return impl_->backend; }
torch::Device ProcessGroup::device() const { return impl_->device; }

std::string ProcessGroup::Impl::unresponsive_ranks() {
  const int64_t n = options.world_size(), me = options.rank();
  const auto grace = std::min(timeout, std::chrono::milliseconds(2000));
  try {
    store->setTimeout(grace);
    store->set("lycoris/failed/" + std::to_string(me), std::vector<uint8_t>{1});
    std::vector<std::string> missing;
    const auto until = std::chrono::steady_clock::now() + grace;
    do {
      missing.clear();
      for (int64_t r = 0; r < n; ++r)
        if (r != me && !store->check({"lycoris/failed/" + std::to_string(r)})) missing.push_back(std::to_string(r));
      if (missing.empty()) return "";
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    } while (std::chrono::steady_clock::now() < until);
    return (missing.size() == 1 ? "; rank " : "; ranks ") + join(missing, ", ") + " did not answer (dead or hung)";
  } catch (const std::exception&) {
    return me == 0 ? "" : "; rank 0 (serving the rendezvous store) did not answer (dead or hung)";
  }
}

void ProcessGroup::Impl::fail(const std::string& what, const std::exception& e) {
  const std::string who = "rank " + std::to_string(options.rank()) + " of " + std::to_string(options.world_size());
  throw DistributedError("distributed: " + what + " failed on " + who + ": " + reason_of(e) + unresponsive_ranks());
}

void ProcessGroup::Impl::wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what) {
  try {
    work->wait(timeout);
  } catch (const std::exception& e) {
    fail(what, e);
  }
}

c10::intrusive_ptr<c10d::Work> ProcessGroup::Impl::start(const std::string& what,
                                                         const std::function<c10::intrusive_ptr<c10d::Work>()>& launch) {
  try {
    return launch();
  } catch (const std::exception& e) {
    fail(what, e);
  }
}

void ProcessGroup::broadcast(torch::Tensor& tensor, int64_t root, const std::string& what) {
  std::vector<torch::Tensor> ts{tensor};
  c10d::BroadcastOptions bo;
  bo.rootRank = root;
  impl_->wait(impl_->start(what, [&] { return impl_->group->broadcast(ts, bo); }), what);
}

void ProcessGroup::all_reduce_sum(torch::Tensor& tensor, const std::string& what) {
  std::vector<torch::Tensor> ts{tensor};
  impl_->wait(impl_->start(what, [&] { return impl_->group->allreduce(ts); }), what);
}

std::vector<torch::Tensor> ProcessGroup::all_gather(const torch::Tensor& tensor, const std::string& what) {
  std::vector<torch::Tensor> in{tensor.contiguous()};
  std::vector<std::vector<torch::Tensor>> out(1);
  for (int64_t r = 0; r < world_size(); ++r) out[0].push_back(torch::empty_like(in[0]));
  impl_->wait(impl_->start(what, [&] { return impl_->group->allgather(out, in); }), what);
  return out[0];
}

std::string ProcessGroup::broadcast_text(const std::string& text, const std::string& what) {
  auto size = torch::tensor({static_cast<int64_t>(text.size())}, torch::kLong).to(device());
  broadcast(size, 0, what);
  const int64_t n = size.item<int64_t>();
  auto bytes = torch::zeros({std::max<int64_t>(n, 1)}, torch::kUInt8);
  if (rank() == 0) std::memcpy(bytes.data_ptr(), text.data(), text.size());
  bytes = bytes.to(device());
  broadcast(bytes, 0, what);
  bytes = bytes.cpu();
  return std::string(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(n));
}

void ProcessGroup::barrier(const std::string& what) {
  // an all-reduce of one number: a barrier that also works on NCCL without a device guess
  auto one = torch::ones({1}, torch::TensorOptions().device(device()));
  all_reduce_sum(one, what);
}

void ProcessGroup::on_rank0(const std::function<void()>& fn, const std::string& what) {
  std::string error;
  if (rank() == 0) {
    try {
      fn();
    } catch (const std::exception& e) {
      error = reason_of(e);
      if (error.empty()) error = "unknown error";
    }
  }
  error = broadcast_text(error, what + " (result from rank 0)");
  if (!error.empty()) throw DistributedError("distributed: " + what + " failed on rank 0: " + error);
}

ProcessGroupPtr init_from_env(Options defaults) {
  return std::make_shared<ProcessGroup>(options_from_env(std::move(defaults)));
}

}  // namespace lycoris::distributed
