// GenerationBackend::Submit plus the per-request metrics that every generating endpoint (gRPC
// Generate and GenerateStream, HTTP image generations) shares.
#ifndef DMDSERVE_SERVER_COUNTED_SUBMIT_H_
#define DMDSERVE_SERVER_COUNTED_SUBMIT_H_

#include "absl/status/status.h"
#include "server/generation_backend.h"
#include "server/metrics.h"

namespace dmdserve {

// Submits (params.model already resolved) and counts the request in the in-flight gauge from
// acceptance to on_done and, on success, its queue wait. Same contract as Submit.
absl::Status SubmitCounted(GenerationBackend& backend, Metrics& metrics, GenerateParams params,
                           GenerateCallbacks callbacks);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_COUNTED_SUBMIT_H_
