#include "worker/cpu_budget.h"

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace dmdserve {
namespace {

std::optional<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::stringstream content;
  content << in.rdbuf();
  return content.str();
}

std::optional<int64_t> ReadInt(const std::string& path) {
  std::optional<std::string> text = ReadFile(path);
  int64_t value = 0;
  if (!text || !absl::SimpleAtoi(absl::StripAsciiWhitespace(*text), &value)) return std::nullopt;
  return value;
}

// `dir` and its ancestors up to and including `root` (both without a trailing slash).
std::vector<std::string> DirsUpTo(const std::string& root, absl::string_view cgroup_path) {
  std::vector<std::string> dirs;
  std::string path(absl::StripSuffix(cgroup_path, "/"));
  while (true) {
    dirs.push_back(absl::StrCat(root, path));
    if (path.empty()) break;
    path.resize(path.rfind('/') == std::string::npos ? 0 : path.rfind('/'));
  }
  return dirs;
}

struct Quota {
  double cpus = 0;
  std::string source;
};

void KeepTighter(std::optional<Quota>& best, double cpus, const std::string& source) {
  if (cpus > 0 && (!best || cpus < best->cpus)) best = Quota{cpus, source};
}

// cgroup v2: "<quota> <period>" or "max <period>" in cpu.max.
void ReadV2Quota(const std::string& root, absl::string_view path, std::optional<Quota>& best) {
  for (const std::string& dir : DirsUpTo(root, path)) {
    const std::string file = dir + "/cpu.max";
    std::optional<std::string> text = ReadFile(file);
    if (!text) continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(absl::StripAsciiWhitespace(*text), ' ', absl::SkipEmpty());
    int64_t quota = 0, period = 0;
    if (fields.size() == 2 && absl::SimpleAtoi(fields[0], &quota) &&
        absl::SimpleAtoi(fields[1], &period) && period > 0) {
      KeepTighter(best, static_cast<double>(quota) / period, file);
    }
  }
}

// cgroup v1: cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us, under the cpu controller's
// mount. In a container the mount's root is the container's own cgroup, which the walk up
// from the (host) path reaches last.
void ReadV1Quota(const std::string& root, absl::string_view controllers, absl::string_view path,
                 std::optional<Quota>& best) {
  for (const std::string& mount : {absl::StrCat(root, "/", controllers), root + "/cpu"}) {
    for (const std::string& dir : DirsUpTo(mount, path)) {
      const std::optional<int64_t> quota = ReadInt(dir + "/cpu.cfs_quota_us");
      const std::optional<int64_t> period = ReadInt(dir + "/cpu.cfs_period_us");
      if (quota && period && *quota > 0 && *period > 0) {
        KeepTighter(best, static_cast<double>(*quota) / *period, dir + "/cpu.cfs_quota_us");
      }
    }
  }
}

std::optional<Quota> ReadQuota(const CpuBudgetSources& sources) {
  std::optional<std::string> cgroups = ReadFile(sources.proc_self_cgroup);
  if (!cgroups) return std::nullopt;
  std::optional<Quota> best;
  for (absl::string_view line : absl::StrSplit(*cgroups, '\n', absl::SkipEmpty())) {
    // hierarchy-ID:controller-list:cgroup-path
    std::vector<absl::string_view> fields = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (fields.size() != 3) continue;
    if (fields[0] == "0" && fields[1].empty()) {
      ReadV2Quota(sources.cgroup_root, fields[2], best);
    } else {
      std::vector<absl::string_view> names = absl::StrSplit(fields[1], ',');
      if (std::find(names.begin(), names.end(), "cpu") != names.end()) {
        ReadV1Quota(sources.cgroup_root, fields[1], fields[2], best);
      }
    }
  }
  return best;
}

int AffinityCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

}  // namespace

std::string CpuBudget::Describe() const {
  std::string quota = "no cgroup CPU quota";
  if (quota_cpus) quota = absl::StrFormat("cgroup quota %.2f from %s", *quota_cpus, quota_source);
  return absl::StrCat(usable_cpus, " CPU", usable_cpus == 1 ? "" : "s", " (affinity ",
                      affinity_cpus, ", ", quota, ")");
}

CpuBudget ReadCpuBudget(const CpuBudgetSources& sources) {
  CpuBudget budget;
  budget.affinity_cpus = std::max(1, sources.affinity_cpus.value_or(AffinityCpus()));
  budget.usable_cpus = budget.affinity_cpus;
  if (std::optional<Quota> quota = ReadQuota(sources)) {
    budget.quota_cpus = quota->cpus;
    budget.quota_source = quota->source;
    const int quota_floor = std::max(1, static_cast<int>(std::floor(quota->cpus)));
    budget.usable_cpus = std::min(budget.usable_cpus, quota_floor);
  }
  return budget;
}

CpuThreadPlan PlanCpuThreads(int usable_cpus, int instances, int intra_op_threads) {
  const int cpus = std::max(1, usable_cpus);
  CpuThreadPlan plan;
  if (instances > 0 && intra_op_threads > 0) {
    plan = {instances, intra_op_threads};
  } else if (instances > 0) {
    plan = {instances, std::max(1, cpus / instances)};
  } else if (intra_op_threads > 0) {
    plan = {std::max(1, cpus / intra_op_threads), intra_op_threads};
  } else {
    const int threads = (cpus + kMaxDefaultCpuInstances - 1) / kMaxDefaultCpuInstances;
    plan = {std::max(1, cpus / threads), threads};
  }
  return plan;
}

CpuThreadPlan PlanThreads(int usable_cpus, bool serves_cpu, int instances, int intra_op_threads) {
  if (serves_cpu) return PlanCpuThreads(usable_cpus, instances, intra_op_threads);
  return {instances > 0 ? instances : 1,
          intra_op_threads > 0 ? intra_op_threads : std::max(1, usable_cpus)};
}

}  // namespace dmdserve
