// Helpers shared by worker/ tests (test code only).
#ifndef DMDSERVE_WORKER_TEST_UTIL_H_
#define DMDSERVE_WORKER_TEST_UTIL_H_

#include <stdlib.h>

#include <filesystem>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace dmdserve::testing {

// A fresh empty directory under the test temp dir; every one is removed when the process exits.
// Thread-safe.
inline std::string MakeTempDir() {
  struct Registry {
    absl::Mutex mu;
    std::vector<std::string> dirs;
    ~Registry() {
      for (const std::string& dir : dirs) std::filesystem::remove_all(dir);
    }
  };
  static Registry* const registry = [] {
    static Registry r;
    return &r;
  }();
  std::string pattern =
      (std::filesystem::path(::testing::TempDir()) / "dmdserve_test_XXXXXX").string();
  EXPECT_NE(mkdtemp(pattern.data()), nullptr) << pattern;
  absl::MutexLock lock(&registry->mu);
  registry->dirs.push_back(pattern);
  return pattern;
}

// Writes `content` to `path`, creating its parent directories.
inline void WriteFile(const std::filesystem::path& path, const std::string& content) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << content;
}

// The whole file as bytes ("" when it cannot be read).
inline std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

// A path in the source tree.
inline std::filesystem::path SourcePath(const std::string& relative) {
  return std::filesystem::path(DMDSERVE_SOURCE_DIR) / relative;
}

// Runs a shell command; true when it exits with 0 (a failure is a test failure).
inline bool RunCommand(const std::string& command) {
  const int status = std::system(command.c_str());
  EXPECT_EQ(status, 0) << command;
  return status == 0;
}

// A bundle that scripts/make_tiny_bundle.py builds with `args` (e.g. "--sdxl --steps 2"), once
// per test process and `args`. Not thread-safe: call it from the test's main thread.
inline std::string BuiltBundle(const std::string& args) {
  static auto* bundles = new std::map<std::string, std::string>();
  auto it = bundles->find(args);
  if (it != bundles->end()) return it->second;
  const std::string dir = MakeTempDir();
  RunCommand(std::string(DMDSERVE_PYTHON) + " " + SourcePath("scripts/make_tiny_bundle.py").string() +
             " --out " + dir + " --tokenizer-dir " +
             SourcePath("models/tiny-random/tokenizer").string() + " " + args);
  return bundles->emplace(args, dir).first->second;
}

}  // namespace dmdserve::testing

#endif  // DMDSERVE_WORKER_TEST_UTIL_H_
