#include "server/counted_submit.h"

#include <string>
#include <utility>

namespace dmdserve {

absl::Status SubmitCounted(GenerationBackend& backend, Metrics& metrics, GenerateParams params,
                           GenerateCallbacks callbacks) {
  const std::string model = params.model;
  callbacks.on_done = [&metrics, model, on_done = std::move(callbacks.on_done)](
                          absl::Status status, GenerateResult result) {
    if (status.ok()) metrics.RecordQueueWait(model, result.timings.queue);
    metrics.AddInFlight(model, -1);
    on_done(std::move(status), std::move(result));
  };
  metrics.AddInFlight(model, 1);
  absl::Status submitted = backend.Submit(std::move(params), std::move(callbacks));
  if (!submitted.ok()) metrics.AddInFlight(model, -1);
  return submitted;
}

}  // namespace dmdserve
