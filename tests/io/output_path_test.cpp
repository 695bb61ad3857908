// io::check_output_path: an output that cannot be written fails before any work, with the path and the
// reason; a writable one passes and leaves nothing behind.
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "lycoris/error.hpp"
#include "lycoris/io/output_path.hpp"
#include "test_util.hpp"

namespace output_path_test {

using namespace lycoris;
namespace fs = std::filesystem;

// The IOError message of check_output_path(path), or "" when it passes.
std::string output_path_error(const std::string& path) {
  try {
    io::check_output_path(path);
    return "";
  } catch (const IOError& e) {
    return e.what();
  }
}

TEST(OutputPath, UnwritablePlacesAreRefusedWithPathAndReason) {
  const std::string dir = test::temp_dir("output_path");
  auto expect = [](const std::string& path, const std::string& reason) {
    const auto e = output_path_error(path);
    EXPECT_EQ(e.rfind(path + ": cannot write here: ", 0), 0u) << e;
    EXPECT_NE(e.find(reason), std::string::npos) << e;
  };
  expect(dir + "/missing/x.safetensors", "directory " + dir + "/missing does not exist");
  expect(dir, "is a directory");
  expect(dir + "/", "is a directory");
  std::ofstream(dir + "/file") << "x";
  expect(dir + "/file/x.safetensors", "is not a directory");
  expect("/dev/null", "not a regular file");
  EXPECT_NE(output_path_error("").find("no output path"), std::string::npos);
  // a directory no file can be created in (permission bits do not stop root: sysfs does)
  std::string ro = dir + "/ro";
  fs::create_directory(ro);
  chmod(ro.c_str(), 0555);
  if (geteuid() == 0) ro = "/sys";
  if (fs::is_directory(ro)) expect(ro + "/x.safetensors", "cannot create temporary file");
  chmod((dir + "/ro").c_str(), 0755);
  EXPECT_EQ(test::listing(dir).size(), 2u);  // file, ro: the checks created nothing
}

TEST(OutputPath, WritablePlacesPassAndLeaveNothingBehind) {
  const std::string dir = test::temp_dir("output_path_ok");
  EXPECT_EQ(output_path_error(dir + "/new.safetensors"), "");
  EXPECT_EQ(test::listing(dir).size(), 0u);
  // an existing output (to be replaced by the write) is left as it is
  std::ofstream(dir + "/old.safetensors") << "old";
  EXPECT_EQ(output_path_error(dir + "/old.safetensors"), "");
  std::ifstream in(dir + "/old.safetensors");
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), "old");
  EXPECT_EQ(test::listing(dir).size(), 1u);
  // a bare file name: the current directory
  const auto cwd = fs::current_path();
  fs::current_path(dir);
  EXPECT_EQ(output_path_error("bare.safetensors"), "");
  fs::current_path(cwd);
  EXPECT_EQ(test::listing(dir).size(), 1u);
}

}  // namespace output_path_test
