// DynamicBatcher: forms batches of work items (one item = one image) for model workers.
//
// Items are enqueued under a batching key (e.g. the output size: only items with the same key can
// share a batch). Workers call NextBatch(), which blocks until some key's queue holds a full batch
// (max_batch_size items, or the worker's own smaller cap) or its oldest item has waited
// max_queue_delay, then returns up to that many items of that key in FIFO order. Just before an item joins a batch it is checked
// by the validator (deadline passed? client cancelled?); rejected items never reach the model and
// are handed to the drop callback with the validator's status.
//
// Capacity: at most max_queued_images items are queued over all keys; an Enqueue that does not fit
// fails at once with RESOURCE_EXHAUSTED and enqueues nothing (a request's images are all or none).
// Shutdown(): Enqueue fails with UNAVAILABLE from then on; NextBatch() keeps handing out what is
// queued (without waiting for the delay) and returns nullopt once the queue is empty, so accepted
// work drains. CancelQueued() ends a drain early: what is still queued goes to the drop callback.
//
// The batcher never sees a model: it is a template over the item type and is tested with a fake
// clock. Thread-safe: any number of producers and consumers. Callbacks are called without the
// internal lock held, on the thread that calls NextBatch().
#ifndef DMDSERVE_WORKER_BATCHER_H_
#define DMDSERVE_WORKER_BATCHER_H_

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker/clock.h"

namespace dmdserve {

struct BatcherOptions {
  // Largest batch handed to a worker, in items (images). Must be >= 1. Default 8.
  int max_batch_size = 8;
  // How long the oldest queued item of a key may wait for its batch to fill before a partial batch
  // is handed out. 0: never wait (hand out whatever is queued). Default 2 ms.
  absl::Duration max_queue_delay = absl::Milliseconds(2);
  // Most items queued at once over all keys. Must be >= max_batch_size. Default 256.
  int max_queued_images = 256;
  // Optional ascending batch sizes a worker can run (e.g. captured CUDA graphs); a formed batch's
  // padded_size is the smallest allowed size >= its item count. Empty: padded_size = item count.
  // When set, the last entry must equal max_batch_size.
  std::vector<int> allowed_batch_sizes;
  // Time source; not owned; nullptr means RealClock::Get().
  Clock* clock = nullptr;
};

// Validates BatcherOptions; the message names the field at fault.
inline absl::Status ValidateBatcherOptions(const BatcherOptions& o) {
  if (o.max_batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch_size must be >= 1, got ", o.max_batch_size));
  }
  if (o.max_queue_delay < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("max_queue_delay must be >= 0");
  }
  if (o.max_queued_images < o.max_batch_size) {
    return absl::InvalidArgumentError(absl::StrCat("max_queued_images (", o.max_queued_images,
                                                   ") must be >= max_batch_size (",
                                                   o.max_batch_size, ")"));
  }
  const auto& sizes = o.allowed_batch_sizes;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] < 1 || (i > 0 && sizes[i] <= sizes[i - 1])) {
      return absl::InvalidArgumentError(
          "allowed_batch_sizes must be positive and strictly ascending");
    }
  }
  if (!sizes.empty() && sizes.back() != o.max_batch_size) {
    return absl::InvalidArgumentError(absl::StrCat("the last allowed_batch_sizes entry (",
                                                   sizes.back(), ") must equal max_batch_size (",
                                                   o.max_batch_size, ")"));
  }
  return absl::OkStatus();
}

template <typename Item, typename Key = int>
class DynamicBatcher {
 public:
  // Returns OK to keep `item`, or the status it is dropped with (e.g. DEADLINE_EXCEEDED).
  using Validator = std::function<absl::Status(const Item& item, absl::Time now)>;
  // Receives each dropped item with the validator's status.
  using DropCallback = std::function<void(Item item, absl::Status status)>;

  struct Batch {
    Key key;
    std::vector<Item> items;  // 1..max_batch_size items, FIFO order
    int padded_size = 0;      // >= items.size(); see BatcherOptions::allowed_batch_sizes
    // When each item was enqueued (parallel to `items`) and when the batch was formed.
    std::vector<absl::Time> enqueue_times;
    absl::Time formed_at;
  };

  static absl::StatusOr<std::unique_ptr<DynamicBatcher>> Create(BatcherOptions options,
                                                                Validator validator,
                                                                DropCallback on_drop) {
    if (absl::Status s = ValidateBatcherOptions(options); !s.ok()) return s;
    if (options.clock == nullptr) options.clock = RealClock::Get();
    return std::unique_ptr<DynamicBatcher>(
        new DynamicBatcher(std::move(options), std::move(validator), std::move(on_drop)));
  }

  // Enqueues all `items` under `key`, or none: RESOURCE_EXHAUSTED when they do not fit,
  // UNAVAILABLE after Shutdown(), INVALID_ARGUMENT when `items` is empty.
  absl::Status Enqueue(const Key& key, std::vector<Item> items) {
    if (items.empty()) return absl::InvalidArgumentError("nothing to enqueue");
    absl::MutexLock lock(&mu_);
    if (shutdown_) return absl::UnavailableError("the server is shutting down");
    const int n = static_cast<int>(items.size());
    if (queued_ + n > options_.max_queued_images) {
      return absl::ResourceExhaustedError(
          absl::StrCat("queue full: ", queued_, " images queued, limit ",
                       options_.max_queued_images, "; retry later"));
    }
    const absl::Time now = options_.clock->Now();
    std::deque<Entry>& queue = queues_[key];
    for (Item& item : items) queue.push_back(Entry{std::move(item), now});
    queued_ += n;
    ++wake_generation_;
    return absl::OkStatus();
  }

  // Blocks until a batch is ready and returns it; returns nullopt once Shutdown() was called and
  // nothing is left queued. `max_items` (1..max_batch_size; 0: max_batch_size) caps this batch
  // and counts as "full" for it: a worker on a device that runs smaller batches best passes its
  // own cap, while the options' max_batch_size bounds every worker.
  std::optional<Batch> NextBatch(int max_items = 0) {
    const int limit = max_items <= 0 ? options_.max_batch_size
                                     : std::min(max_items, options_.max_batch_size);
    while (true) {
      std::vector<Entry> dropped_entries;
      std::vector<absl::Status> drop_status;
      std::optional<Batch> batch;
      {
        absl::MutexLock lock(&mu_);
        while (true) {
          const absl::Time now = options_.clock->Now();
          auto ready = ReadyQueue(now, limit);
          if (ready != queues_.end()) {
            batch = TakeBatch(ready, now, limit, &dropped_entries, &drop_status);
            break;
          }
          if (shutdown_ && queued_ == 0) break;
          // Sleep until the oldest item's delay runs out or the queues change.
          WakeArgs args{this, wake_generation_};
          const absl::Condition changed(&QueuesChanged, &args);
          options_.clock->AwaitWithDeadline(&mu_, changed, EarliestFlushTime());
        }
      }
      for (size_t i = 0; i < dropped_entries.size(); ++i) {
        on_drop_(std::move(dropped_entries[i].item), drop_status[i]);
      }
      if (batch.has_value() && !batch->items.empty()) return batch;
      if (!batch.has_value()) return std::nullopt;  // shut down and drained
      // Every item of the batch was dropped: look again.
    }
  }

  // Stops accepting items and makes NextBatch() drain what is queued without waiting. Idempotent.
  void Shutdown() {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
    ++wake_generation_;
  }

  // Takes every queued item out and hands each to the drop callback with `status` (on the
  // calling thread, without the lock held); returns how many. For a drain that ran out of time:
  // call after Shutdown(), and the workers find the queue empty once their batches are done.
  int CancelQueued(const absl::Status& status) {
    std::vector<Entry> taken;
    {
      absl::MutexLock lock(&mu_);
      for (auto& [key, queue] : queues_) {
        for (Entry& entry : queue) taken.push_back(std::move(entry));
      }
      queues_.clear();
      queued_ = 0;
      ++wake_generation_;
    }
    for (Entry& entry : taken) on_drop_(std::move(entry.item), status);
    return static_cast<int>(taken.size());
  }

  int queued_images() const {
    absl::MutexLock lock(&mu_);
    return queued_;
  }

  const BatcherOptions& options() const { return options_; }

 private:
  struct Entry {
    Item item;
    absl::Time enqueued;
  };
  using QueueMap = std::map<Key, std::deque<Entry>>;

  DynamicBatcher(BatcherOptions options, Validator validator, DropCallback on_drop)
      : options_(std::move(options)),
        validator_(std::move(validator)),
        on_drop_(std::move(on_drop)) {}

  // The queue to take a batch from now (full, timed out, or draining), oldest head first;
  // queues_.end() when none is ready.
  typename QueueMap::iterator ReadyQueue(absl::Time now, int limit)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto best = queues_.end();
    for (auto it = queues_.begin(); it != queues_.end(); ++it) {
      const std::deque<Entry>& q = it->second;
      if (q.empty()) continue;
      const bool ready = shutdown_ || static_cast<int>(q.size()) >= limit ||
                         now >= q.front().enqueued + options_.max_queue_delay;
      if (ready && (best == queues_.end() || q.front().enqueued < best->second.front().enqueued)) {
        best = it;
      }
    }
    return best;
  }

  // When the oldest waiting item of any queue reaches its delay (InfiniteFuture if none queued).
  absl::Time EarliestFlushTime() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::Time t = absl::InfiniteFuture();
    for (const auto& [key, q] : queues_) {
      if (!q.empty()) t = std::min(t, q.front().enqueued + options_.max_queue_delay);
    }
    return t;
  }

  // A waiting worker re-plans whenever items were enqueued or taken, or shutdown started.
  struct WakeArgs {
    const DynamicBatcher* batcher;
    uint64_t generation;
  };
  static bool QueuesChanged(WakeArgs* args) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return args->batcher->wake_generation_ != args->generation;
  }

  Batch TakeBatch(typename QueueMap::iterator it, absl::Time now, int limit,
                  std::vector<Entry>* dropped, std::vector<absl::Status>* drop_status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Batch batch;
    batch.key = it->first;
    batch.formed_at = now;
    std::deque<Entry>& q = it->second;
    while (!q.empty() && static_cast<int>(batch.items.size()) < limit) {
      Entry entry = std::move(q.front());
      q.pop_front();
      --queued_;
      absl::Status s = validator_ ? validator_(entry.item, now) : absl::OkStatus();
      if (!s.ok()) {
        dropped->push_back(std::move(entry));
        drop_status->push_back(std::move(s));
        continue;
      }
      batch.enqueue_times.push_back(entry.enqueued);
      batch.items.push_back(std::move(entry.item));
    }
    if (q.empty()) queues_.erase(it);
    batch.padded_size = PaddedSize(static_cast<int>(batch.items.size()));
    ++wake_generation_;  // other workers re-plan: the queue they waited on may have changed
    return batch;
  }

  int PaddedSize(int n) const {
    for (int s : options_.allowed_batch_sizes) {
      if (s >= n) return s;
    }
    return n;
  }

  const BatcherOptions options_;
  const Validator validator_;
  const DropCallback on_drop_;

  mutable absl::Mutex mu_;
  QueueMap queues_ ABSL_GUARDED_BY(mu_);
  int queued_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t wake_generation_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_BATCHER_H_
