#include "worker/thread_pool.h"

#include <atomic>
#include <set>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace dmdserve {
namespace {

TEST(ThreadPoolTest, RejectsZeroThreads) {
  auto pool = ThreadPool::Create({.num_threads = 0});
  EXPECT_EQ(pool.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(pool.status().message().find("num_threads"), std::string::npos);
}

TEST(ThreadPoolTest, RunsEveryClosureBeforeDestructionCompletes) {
  std::atomic<int> ran{0};
  {
    auto pool = ThreadPool::Create({.num_threads = 3});
    ASSERT_TRUE(pool.ok());
    for (int i = 0; i < 1000; ++i) (*pool)->Schedule([&] { ++ran; });
  }
  EXPECT_EQ(ran.load(), 1000);
}

TEST(ThreadPoolTest, RunsOffTheCallingThreadOnSeveralThreads) {
  auto pool = ThreadPool::Create({.num_threads = 2});
  ASSERT_TRUE(pool.ok());
  absl::Mutex mu;
  std::set<std::thread::id> ids;
  absl::Notification both_running;
  std::atomic<int> arrived{0};
  for (int i = 0; i < 2; ++i) {
    (*pool)->Schedule([&] {
      {
        absl::MutexLock lock(&mu);
        ids.insert(std::this_thread::get_id());
      }
      // Both closures must be running at once for either to finish: proves 2 threads.
      if (++arrived == 2) both_running.Notify();
      both_running.WaitForNotification();
    });
  }
  both_running.WaitForNotification();
  pool->reset();
  EXPECT_EQ(ids.size(), 2u);
  EXPECT_EQ(ids.count(std::this_thread::get_id()), 0u);
}

}  // namespace
}  // namespace dmdserve
