#include "server/fd_limit.h"

#include <sys/resource.h>

#include <algorithm>

#include "gtest/gtest.h"

namespace dmdserve {
namespace {

rlimit Current() {
  rlimit limit{};
  EXPECT_EQ(getrlimit(RLIMIT_NOFILE, &limit), 0);
  return limit;
}

TEST(FdLimitTest, RaisesALoweredSoftLimitToTheHardLimit) {
  rlimit limit = Current();
  const uint64_t hard = limit.rlim_max == RLIM_INFINITY ? kMaxFdLimit : limit.rlim_max;
  ASSERT_GT(hard, 64u) << "the test needs room below the hard limit";
  limit.rlim_cur = 64;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &limit), 0);

  absl::StatusOr<FdLimits> limits = RaiseFdLimit();
  ASSERT_TRUE(limits.ok()) << limits.status();
  EXPECT_EQ(limits->soft_before, 64u);
  EXPECT_EQ(limits->soft, std::min(hard, kMaxFdLimit));
  EXPECT_EQ(limits->hard, hard);
  EXPECT_EQ(Current().rlim_cur, std::min(hard, kMaxFdLimit));
}

TEST(FdLimitTest, ASoftLimitAtTheTargetIsLeftAlone) {
  ASSERT_TRUE(RaiseFdLimit().ok());
  const rlimit before = Current();
  absl::StatusOr<FdLimits> limits = RaiseFdLimit();
  ASSERT_TRUE(limits.ok()) << limits.status();
  EXPECT_EQ(limits->soft, limits->soft_before);
  EXPECT_EQ(Current().rlim_cur, before.rlim_cur);
}

}  // namespace
}  // namespace dmdserve
