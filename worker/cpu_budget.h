// CPU budget: how many CPUs this process may keep busy, and how the model workers share them.
//
// A process may use fewer CPUs than the machine has: its affinity mask (taskset, Kubernetes'
// static CPU manager) and its cgroup's CPU quota (a pod's CPU limit, `docker run --cpus`) both
// cap it. Threads beyond the budget do not run faster; under a quota they make the whole process
// throttled for the rest of each period. ReadCpuBudget() finds the budget; PlanCpuThreads() turns
// it into model-worker threads × libtorch intra-op threads.
//
// cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`) are read through
// /proc/self/cgroup; the tightest quota of the process's cgroup and its ancestors counts. Files
// that are missing or unreadable mean "no quota": the budget never fails to be found.
//
// Thread safety: free functions without shared state.
#ifndef DMDSERVE_WORKER_CPU_BUDGET_H_
#define DMDSERVE_WORKER_CPU_BUDGET_H_

#include <optional>
#include <string>

namespace dmdserve {

struct CpuBudget {
  int affinity_cpus = 1;  // CPUs in the process's affinity mask (>= 1)
  // The cgroup CPU quota in CPUs (quota / period, e.g. 2.5), and the file it came from; absent
  // when there is none.
  std::optional<double> quota_cpus;
  std::string quota_source;
  // min(affinity_cpus, the quota rounded down, at least 1): threads that can run at once without
  // being throttled.
  int usable_cpus = 1;

  // One line for the start-up log, e.g. "2 CPUs (affinity 64, cgroup quota 2.50 from
  // /sys/fs/cgroup/cpu.max)".
  std::string Describe() const;
};

// Where ReadCpuBudget looks; tests point it at fake files.
struct CpuBudgetSources {
  std::string proc_self_cgroup = "/proc/self/cgroup";
  std::string cgroup_root = "/sys/fs/cgroup";
  // CPUs in the affinity mask; absent: sched_getaffinity of this process.
  std::optional<int> affinity_cpus;
};

// Reads the process's CPU budget. Never fails: an unreadable source counts as no limit.
CpuBudget ReadCpuBudget(const CpuBudgetSources& sources = {});

// Model-worker threads per CPU device and libtorch intra-op threads per worker.
struct CpuThreadPlan {
  int instances = 1;         // model workers (execution instances) per model on the CPU
  int intra_op_threads = 1;  // libtorch intra-op threads (process-wide)
};

// At most this many CPU model workers per model when neither count is given: past it, extra
// cores go to intra-op threads, so that a big model's latency still falls with the cores.
inline constexpr int kMaxDefaultCpuInstances = 4;

// Splits `usable_cpus` between model workers and intra-op threads. A count > 0 is taken as given;
// 0 means "derive it": with neither given, intra-op threads = ceil(usable / 4) and workers =
// usable / threads (2 CPUs: 2 × 1; 8: 4 × 2; 64: 4 × 16), because independent batches on single
// threads keep every core busy where one batch split across threads waits on its slowest part;
// with one given, the other is usable / given (at least 1).
CpuThreadPlan PlanCpuThreads(int usable_cpus, int instances, int intra_op_threads);

// The plan for a set of devices: PlanCpuThreads when they include the CPU; otherwise (GPUs
// only) 1 model worker per device and every usable CPU for libtorch's host-side work, each
// unless given (> 0).
CpuThreadPlan PlanThreads(int usable_cpus, bool serves_cpu, int instances, int intra_op_threads);

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_CPU_BUDGET_H_
