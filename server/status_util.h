// The one place where absl::Status becomes grpc::Status.
#ifndef DMDSERVE_SERVER_STATUS_UTIL_H_
#define DMDSERVE_SERVER_STATUS_UTIL_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace dmdserve {

// Maps the canonical code one to one and keeps the message, cut to 1 KiB (a status message
// travels in an HTTP/2 trailer).
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_STATUS_UTIL_H_
