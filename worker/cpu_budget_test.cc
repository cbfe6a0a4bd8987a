#include "worker/cpu_budget.h"

#include <sched.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmdserve {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// A fake /proc/self/cgroup and cgroup file system under a fresh temporary directory.
class CpuBudgetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("cpu_budget_test_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_ / "cgroup");
    sources_.proc_self_cgroup = (root_ / "proc_self_cgroup").string();
    sources_.cgroup_root = (root_ / "cgroup").string();
    sources_.affinity_cpus = 64;
  }
  void TearDown() override { fs::remove_all(root_); }

  void Write(const std::string& relative, const std::string& content) {
    const fs::path path = root_ / relative;
    fs::create_directories(path.parent_path());
    std::ofstream(path) << content;
  }

  fs::path root_;
  CpuBudgetSources sources_;
};

TEST_F(CpuBudgetTest, NoCgroupFileMeansAffinityOnly) {
  const CpuBudget budget = ReadCpuBudget(sources_);
  EXPECT_EQ(budget.affinity_cpus, 64);
  EXPECT_FALSE(budget.quota_cpus.has_value());
  EXPECT_EQ(budget.usable_cpus, 64);
  EXPECT_THAT(budget.Describe(), HasSubstr("no cgroup CPU quota"));
}

TEST_F(CpuBudgetTest, CgroupV2QuotaCapsTheBudgetRoundedDown) {
  Write("proc_self_cgroup", "0::/kubepods/pod1/c1\n");
  Write("cgroup/kubepods/pod1/c1/cpu.max", "250000 100000\n");
  const CpuBudget budget = ReadCpuBudget(sources_);
  ASSERT_TRUE(budget.quota_cpus.has_value());
  EXPECT_DOUBLE_EQ(*budget.quota_cpus, 2.5);
  EXPECT_EQ(budget.usable_cpus, 2);
  EXPECT_THAT(budget.quota_source, HasSubstr("kubepods/pod1/c1/cpu.max"));
  EXPECT_THAT(budget.Describe(), HasSubstr("2 CPUs (affinity 64, cgroup quota 2.50"));
}

TEST_F(CpuBudgetTest, CgroupV2TightestAncestorWinsAndMaxIsNoLimit) {
  Write("proc_self_cgroup", "0::/kubepods/pod1/c1\n");
  Write("cgroup/kubepods/pod1/c1/cpu.max", "max 100000\n");
  Write("cgroup/kubepods/pod1/cpu.max", "400000 100000\n");
  Write("cgroup/kubepods/cpu.max", "1600000 100000\n");
  const CpuBudget budget = ReadCpuBudget(sources_);
  EXPECT_DOUBLE_EQ(budget.quota_cpus.value_or(0), 4.0);
  EXPECT_EQ(budget.usable_cpus, 4);
}

TEST_F(CpuBudgetTest, CgroupV2InAContainerReadsTheNamespaceRoot) {
  Write("proc_self_cgroup", "0::/\n");
  Write("cgroup/cpu.max", "300000 100000\n");
  EXPECT_EQ(ReadCpuBudget(sources_).usable_cpus, 3);
}

TEST_F(CpuBudgetTest, QuotaBelowOneCpuStillLeavesOne) {
  Write("proc_self_cgroup", "0::/\n");
  Write("cgroup/cpu.max", "50000 100000\n");
  const CpuBudget budget = ReadCpuBudget(sources_);
  EXPECT_DOUBLE_EQ(budget.quota_cpus.value_or(0), 0.5);
  EXPECT_EQ(budget.usable_cpus, 1);
}

TEST_F(CpuBudgetTest, AffinityBelowQuotaWins) {
  sources_.affinity_cpus = 2;
  Write("proc_self_cgroup", "0::/\n");
  Write("cgroup/cpu.max", "800000 100000\n");
  EXPECT_EQ(ReadCpuBudget(sources_).usable_cpus, 2);
}

TEST_F(CpuBudgetTest, CgroupV1QuotaUnderTheCpuControllerMount) {
  // Docker on cgroup v1: the path is the host's, the mount's root is the container's cgroup.
  Write("proc_self_cgroup", "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n");
  Write("cgroup/cpu,cpuacct/cpu.cfs_quota_us", "150000\n");
  Write("cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
  const CpuBudget budget = ReadCpuBudget(sources_);
  EXPECT_DOUBLE_EQ(budget.quota_cpus.value_or(0), 1.5);
  EXPECT_EQ(budget.usable_cpus, 1);
}

TEST_F(CpuBudgetTest, CgroupV1UnlimitedAndMalformedFilesAreNoQuota) {
  Write("proc_self_cgroup", "4:cpu,cpuacct:/a\n0::/b\n");
  Write("cgroup/cpu,cpuacct/a/cpu.cfs_quota_us", "-1\n");
  Write("cgroup/cpu,cpuacct/a/cpu.cfs_period_us", "100000\n");
  Write("cgroup/b/cpu.max", "lots 100000\n");
  const CpuBudget budget = ReadCpuBudget(sources_);
  EXPECT_FALSE(budget.quota_cpus.has_value());
  EXPECT_EQ(budget.usable_cpus, 64);
}

TEST(CpuBudgetRealTest, AffinityMatchesSchedGetaffinity) {
  cpu_set_t set;
  CPU_ZERO(&set);
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  const CpuBudget budget = ReadCpuBudget();
  EXPECT_EQ(budget.affinity_cpus, CPU_COUNT(&set));
  EXPECT_GE(budget.usable_cpus, 1);
  EXPECT_LE(budget.usable_cpus, budget.affinity_cpus);
}

TEST(PlanCpuThreadsTest, DerivedSplitsKeepEveryCoreBusy) {
  struct Case {
    int cpus, instances, threads;
  };
  for (const Case& c : {Case{1, 1, 1}, Case{2, 2, 1}, Case{3, 3, 1}, Case{4, 4, 1}, Case{6, 3, 2},
                        Case{8, 4, 2}, Case{64, 4, 16}}) {
    const CpuThreadPlan plan = PlanCpuThreads(c.cpus, 0, 0);
    EXPECT_EQ(plan.instances, c.instances) << c.cpus << " CPUs";
    EXPECT_EQ(plan.intra_op_threads, c.threads) << c.cpus << " CPUs";
  }
}

TEST(PlanCpuThreadsTest, GivenCountsAreKeptAndTheOtherFillsTheBudget) {
  EXPECT_EQ(PlanCpuThreads(8, 2, 0).intra_op_threads, 4);
  EXPECT_EQ(PlanCpuThreads(8, 2, 0).instances, 2);
  EXPECT_EQ(PlanCpuThreads(8, 0, 8).instances, 1);
  EXPECT_EQ(PlanCpuThreads(8, 0, 3).instances, 2);
  EXPECT_EQ(PlanCpuThreads(2, 5, 0).intra_op_threads, 1);
  EXPECT_EQ(PlanCpuThreads(2, 0, 4).instances, 1);
  const CpuThreadPlan both = PlanCpuThreads(2, 3, 7);
  EXPECT_EQ(both.instances, 3);
  EXPECT_EQ(both.intra_op_threads, 7);
}

TEST(PlanThreadsTest, GpusOnlyGetOneWorkerAndEveryCpuForHostWork) {
  const CpuThreadPlan gpu = PlanThreads(16, /*serves_cpu=*/false, 0, 0);
  EXPECT_EQ(gpu.instances, 1);
  EXPECT_EQ(gpu.intra_op_threads, 16);
  const CpuThreadPlan given = PlanThreads(16, /*serves_cpu=*/false, 3, 2);
  EXPECT_EQ(given.instances, 3);
  EXPECT_EQ(given.intra_op_threads, 2);
  const CpuThreadPlan cpu = PlanThreads(16, /*serves_cpu=*/true, 0, 0);
  EXPECT_EQ(cpu.instances, 4);
  EXPECT_EQ(cpu.intra_op_threads, 4);
}

}  // namespace
}  // namespace dmdserve
