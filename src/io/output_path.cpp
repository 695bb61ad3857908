#include "lycoris/io/output_path.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <filesystem>

#include "atomic_file.hpp"
#include "lycoris/error.hpp"

namespace lycoris::io {

void check_output_path(const std::string& path) {
  auto fail = [&](const std::string& reason) { throw IOError(path + ": cannot write here: " + reason); };
  if (path.empty()) fail("no output path given");
  detail::refuse_non_regular_output(path);
  struct stat st {};
  auto parent = std::filesystem::path(path).parent_path().string();
  if (parent.empty()) parent = ".";
  if (::stat(parent.c_str(), &st) != 0) {
    if (errno == ENOENT) fail("directory " + parent + " does not exist");
    if (errno == ENOTDIR) fail(parent + " is not a directory");
    fail(parent + ": " + detail::errno_text());
  }
  if (!S_ISDIR(st.st_mode)) fail(parent + " is not a directory");
  // The writer's own temporary, created and removed: the same name, flags and permissions as the real
  // write, so read-only directories and filesystems, and names too long for the temporary, fail here.
  try {
    detail::AtomicFile probe(path);
  } catch (const IOError& e) {
    std::string why = e.what();
    if (why.rfind(path + ": ", 0) == 0) why.erase(0, path.size() + 2);
    fail(why);
  }
}

}  // namespace lycoris::io
