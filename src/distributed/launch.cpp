// lycoris::distributed::launch_local: torchrun's single-machine launch, for programs started without torchrun
// (docs/training.md#distributed).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "lycoris/distributed.hpp"

extern char** environ;

namespace lycoris::distributed {

int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  const bool ok = fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  if (fd >= 0) ::close(fd);
  if (!ok) throw IOError("cannot find a free loopback port");
  return ntohs(addr.sin_port);
}

namespace {

int status_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

}  // namespace

int launch_local(int nproc, const std::vector<std::string>& args, const std::vector<std::string>& env) {
  if (nproc < 1) throw OptionError("launch_local: the process count must be at least 1, got " + std::to_string(nproc));
  if (args.empty()) throw OptionError("launch_local: args must hold at least the program name");
  const std::string port = std::to_string(free_loopback_port());
  // everything the children need is built before fork: between fork and exec only system calls
  std::vector<std::vector<std::string>> envs(static_cast<size_t>(nproc));
  for (int r = 0; r < nproc; ++r) {
    auto& e = envs[static_cast<size_t>(r)];
    for (char** v = environ; *v; ++v) e.emplace_back(*v);
    e.insert(e.end(), env.begin(), env.end());
    for (const std::string kv :
         {"RANK=" + std::to_string(r), "LOCAL_RANK=" + std::to_string(r), "WORLD_SIZE=" + std::to_string(nproc),
          "LOCAL_WORLD_SIZE=" + std::to_string(nproc), std::string("MASTER_ADDR=127.0.0.1"), "MASTER_PORT=" + port})
      e.push_back(kv);
  }
  std::vector<std::string> argv_s = args;
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::vector<char*>> envps;
  for (auto& e : envs) {
    envps.emplace_back();
    for (auto& kv : e) envps.back().push_back(kv.data());
    envps.back().push_back(nullptr);
  }
  std::vector<pid_t> pids;
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      for (pid_t p : pids) ::kill(p, SIGKILL), ::waitpid(p, nullptr, 0);
      throw IOError("launch_local: fork failed");
    }
    if (pid == 0) {
      ::execve("/proc/self/exe", argv.data(), envps[static_cast<size_t>(r)].data());
      _exit(127);
    }
    pids.push_back(pid);
  }
  // Wait for all; after the first failure the others get SIGTERM, then SIGKILL 5 s later.
  int result = 0;
  size_t running = pids.size();
  std::vector<char> done(pids.size(), 0);
  std::chrono::steady_clock::time_point kill_at{};
  while (running > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      int status = 0;
      if (done[i] || ::waitpid(pids[i], &status, WNOHANG) != pids[i]) continue;
      done[i] = 1;
      --running;
      if (status_code(status) != 0 && result == 0) {
        result = status_code(status);
        for (size_t j = 0; j < pids.size(); ++j)
          if (!done[j]) ::kill(pids[j], SIGTERM);
        kill_at = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      }
    }
    if (result != 0 && std::chrono::steady_clock::now() > kill_at)
      for (size_t j = 0; j < pids.size(); ++j)
        if (!done[j]) ::kill(pids[j], SIGKILL);
    if (running > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return result;
}

}  // namespace lycoris::distributed
