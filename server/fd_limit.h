// RaiseFdLimit: lifts the process's soft limit on open files (RLIMIT_NOFILE) to its hard limit
// at start-up.
//
// Every gRPC connection, /metrics connection and model file holds a descriptor. Distributions
// start processes with a soft limit of 1024 (and containers often lower), far below the hard
// limit the administrator allows; at the soft limit accept() fails with EMFILE and new clients
// are refused. A server should run at the limit it is allowed, as nginx and envoy do.
//
// Not thread-safe against other setrlimit callers: call once at start-up.
#ifndef DMDSERVE_SERVER_FD_LIMIT_H_
#define DMDSERVE_SERVER_FD_LIMIT_H_

#include <cstdint>

#include "absl/status/statusor.h"

namespace dmdserve {

struct FdLimits {
  uint64_t soft_before = 0;  // the soft limit found
  uint64_t soft = 0;         // the soft limit now
  uint64_t hard = 0;         // the hard limit (unchanged)
};

// Largest soft limit RaiseFdLimit sets when the hard limit is unlimited (Linux's default
// fs.nr_open).
inline constexpr uint64_t kMaxFdLimit = uint64_t{1} << 20;

// Raises the soft RLIMIT_NOFILE to min(hard, kMaxFdLimit) unless it is already there or above.
// INTERNAL with errno's text when getrlimit or setrlimit fails (the limits are then unchanged).
absl::StatusOr<FdLimits> RaiseFdLimit();

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_FD_LIMIT_H_
