#include "worker/batch_size_tuner.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"

namespace dmdserve {
namespace {

absl::Status Validate(const BatchTuningOptions& o) {
  if (o.batch_sizes.empty()) return absl::InvalidArgumentError("batch_sizes: at least one");
  for (size_t i = 0; i < o.batch_sizes.size(); ++i) {
    if (o.batch_sizes[i] < 1 || (i > 0 && o.batch_sizes[i] <= o.batch_sizes[i - 1])) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch_sizes must be >= 1 and strictly ascending, got ",
                       absl::StrJoin(o.batch_sizes, ",")));
    }
  }
  if (o.concurrency < 1) return absl::InvalidArgumentError("concurrency must be >= 1");
  if (o.min_runs < 1) return absl::InvalidArgumentError("min_runs must be >= 1");
  if (o.min_time < absl::ZeroDuration()) return absl::InvalidArgumentError("min_time must be >= 0");
  if (o.min_gain < 0) return absl::InvalidArgumentError("min_gain must be >= 0");
  return absl::OkStatus();
}

// Runs batches of `batch_size` from `concurrency` threads until each has done min_runs and
// min_time has passed, and returns the images per second over the whole measurement.
absl::StatusOr<BatchCost> Measure(const BatchTuningOptions& o, Clock& clock, int batch_size,
                                  const RunBatchFn& run) {
  std::atomic<int64_t> batches{0};
  absl::Mutex mu;
  absl::Status first_error;
  const absl::Time start = clock.Now();
  const auto loop = [&] {
    for (int runs = 0; runs < o.min_runs || clock.Now() - start < o.min_time; ++runs) {
      if (absl::Status s = run(batch_size); !s.ok()) {
        absl::MutexLock lock(&mu);
        if (first_error.ok()) first_error = s;
        return;
      }
      batches.fetch_add(1);
    }
  };
  std::vector<std::thread> others;
  for (int i = 1; i < o.concurrency; ++i) others.emplace_back(loop);
  loop();
  for (std::thread& t : others) t.join();
  if (!first_error.ok()) {
    return absl::Status(first_error.code(),
                        absl::StrCat("batch size ", batch_size, ": ", first_error.message()));
  }
  const double seconds = absl::ToDoubleSeconds(clock.Now() - start);
  const double images = static_cast<double>(batches.load()) * batch_size;
  return BatchCost{batch_size, seconds > 0 ? images / seconds : 0};
}

}  // namespace

std::string BatchSizeChoice::Describe() const {
  const auto format = [](std::string* out, const BatchCost& c) {
    absl::StrAppendFormat(out, "%d: %.1f", c.batch_size, c.images_per_second);
  };
  return absl::StrCat(absl::StrJoin(measured, ", ", format), " images/s -> ", max_batch_size);
}

int ChooseBatchSize(absl::Span<const BatchCost> measured, double min_gain) {
  if (measured.empty()) return 0;
  const BatchCost* best = &measured[0];
  for (const BatchCost& cost : measured.subspan(1)) {
    if (cost.images_per_second < best->images_per_second * (1 + min_gain)) break;
    best = &cost;
  }
  return best->batch_size;
}

absl::StatusOr<BatchSizeChoice> TuneBatchSize(const BatchTuningOptions& options,
                                              const RunBatchFn& run) {
  if (absl::Status s = Validate(options); !s.ok()) return s;
  Clock& clock = options.clock != nullptr ? *options.clock : *RealClock::Get();
  BatchSizeChoice choice;
  for (const int batch_size : options.batch_sizes) {
    absl::StatusOr<BatchCost> cost = Measure(options, clock, batch_size, run);
    if (!cost.ok()) return cost.status();
    choice.measured.push_back(*cost);
    choice.max_batch_size = ChooseBatchSize(choice.measured, options.min_gain);
    if (choice.max_batch_size != batch_size) break;  // no gain: larger sizes are not tried
  }
  return choice;
}

}  // namespace dmdserve
