#include "server/fd_limit.h"

#include <sys/resource.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace dmdserve {

absl::StatusOr<FdLimits> RaiseFdLimit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) {
    return absl::InternalError(absl::StrCat("getrlimit(RLIMIT_NOFILE): ", std::strerror(errno)));
  }
  FdLimits limits;
  limits.hard = limit.rlim_max == RLIM_INFINITY ? kMaxFdLimit : limit.rlim_max;
  limits.soft_before = limit.rlim_cur == RLIM_INFINITY ? kMaxFdLimit : limit.rlim_cur;
  const uint64_t target = std::min(limits.hard, kMaxFdLimit);
  limits.soft = limits.soft_before;
  if (limits.soft_before >= target) return limits;
  limit.rlim_cur = target;
  if (setrlimit(RLIMIT_NOFILE, &limit) != 0) {
    return absl::InternalError(absl::StrCat("setrlimit(RLIMIT_NOFILE, soft ", target,
                                            "): ", std::strerror(errno)));
  }
  limits.soft = target;
  return limits;
}

}  // namespace dmdserve
