// The README's C++ blocks are files the build compiles and CTest runs (examples/readme_*.cpp): each block
// must be the file it names, character for character, and each such file must be in the README.
#include <gtest/gtest.h>

#include <filesystem>
#include <regex>
#include <set>
#include <string>

#include "test_util.hpp"

namespace readme_test {

// The project's root: tests/data/.. /..
std::string root() { return std::filesystem::path(lycoris::test::data_path("")).parent_path().parent_path().parent_path().string(); }

TEST(Readme, CodeBlocksAreTheExampleFilesTheyName) {
  const std::string readme = lycoris::test::slurp(root() + "/README.md");
  ASSERT_FALSE(readme.empty());
  // a block "```cpp\n…```" whose nearest preceding link names examples/readme_*.cpp
  const std::regex block(R"(```cpp\n([\s\S]*?)```)");
  const std::regex link(R"(examples/(readme_[a-z_]+\.cpp))");
  size_t blocks = 0;
  std::set<std::string> named;
  for (auto it = std::sregex_iterator(readme.begin(), readme.end(), block); it != std::sregex_iterator(); ++it) {
    const std::string before = readme.substr(0, static_cast<size_t>(it->position(0)));
    std::string file;
    for (auto l = std::sregex_iterator(before.begin(), before.end(), link); l != std::sregex_iterator(); ++l) file = (*l)[1];
    ASSERT_FALSE(file.empty()) << "a C++ block of README.md names no examples/readme_*.cpp file:\n" << (*it)[1];
    named.insert(file);
    ++blocks;
    EXPECT_EQ((*it)[1].str(), lycoris::test::slurp(root() + "/examples/" + file))
        << "README.md's block differs from examples/" << file << " (copy the file into the README)";
  }
  EXPECT_GE(blocks, 2u);
  for (const auto& entry : std::filesystem::directory_iterator(root() + "/examples")) {
    const auto name = entry.path().filename().string();
    if (name.rfind("readme_", 0) == 0) EXPECT_TRUE(named.count(name)) << name << " is not shown in README.md";
  }
}

}  // namespace readme_test
