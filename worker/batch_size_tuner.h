// Batch-size tuning: the largest batch a device should run, chosen by timing it.
//
// A bigger batch is not always cheaper per image. On a GPU it usually is, up to the memory the
// device has; on a CPU, per-image cost falls while a batch's activations fit the caches and
// rises once they do not (fashion-dmd on the 2-core development machine: 204, 267, 331, then
// 231 images/s at batches 1, 2, 4, 8). Capping batches where the per-image cost stops falling
// keeps the service at its best rate under load and its latency low.
//
// TuneBatchSize() times the candidate batch sizes in ascending order, each with `concurrency`
// threads running batches at once (the device's model workers, which is how it serves under
// load), and stops at the first size that is not at least `min_gain` faster than the best so far:
// that best is the choice. ChooseBatchSize() is the same rule over given measurements.
//
// Thread safety: free functions; `run` is called from `concurrency` threads at once.
#ifndef DMDSERVE_WORKER_BATCH_SIZE_TUNER_H_
#define DMDSERVE_WORKER_BATCH_SIZE_TUNER_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "worker/clock.h"

namespace dmdserve {

// The measured throughput of one batch size.
struct BatchCost {
  int batch_size = 0;
  double images_per_second = 0;
};

struct BatchSizeChoice {
  int max_batch_size = 0;
  std::vector<BatchCost> measured;  // ascending batch sizes, as far as the tuning went

  // "1: 204, 2: 267, 4: 331, 8: 231 images/s -> 4", for the start-up log.
  std::string Describe() const;
};

struct BatchTuningOptions {
  // Candidate batch sizes, strictly ascending, >= 1. At least one.
  std::vector<int> batch_sizes;
  // Threads running batches at once during each measurement. >= 1. Default 1.
  int concurrency = 1;
  // Each thread runs at least this many batches of a size... >= 1. Default 1.
  int min_runs = 1;
  // ...and keeps running them until this long has passed since the size's measurement began.
  // Default 250 ms: long enough for a fast model to run dozens of batches, short enough that a
  // bundle with five batch sizes adds about a second to warm-up.
  absl::Duration min_time = absl::Milliseconds(250);
  // A larger batch is chosen only when it serves at least this fraction more images per second
  // than the best smaller one (so that noise does not buy latency). >= 0. Default 0.03.
  double min_gain = 0.03;
  // Time source; not owned; nullptr: the real clock.
  Clock* clock = nullptr;
};

// Runs one batch of `batch_size` images; OK or the failure that ends the tuning.
using RunBatchFn = std::function<absl::Status(int batch_size)>;

// Times the candidates as the file comment says and returns the choice. INVALID_ARGUMENT naming
// the option for bad options; a failed run's status, prefixed with its batch size.
absl::StatusOr<BatchSizeChoice> TuneBatchSize(const BatchTuningOptions& options,
                                              const RunBatchFn& run);

// The rule alone: walking `measured` in order, a batch size replaces the best so far when its
// images/s is at least (1 + min_gain) times the best's; the walk stops at the first that is not.
// 0 for an empty list.
int ChooseBatchSize(absl::Span<const BatchCost> measured, double min_gain);

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_BATCH_SIZE_TUNER_H_
