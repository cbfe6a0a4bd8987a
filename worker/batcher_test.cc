#include "worker/batcher.h"

#include <atomic>
#include <set>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/clock.h"

namespace dmdserve {
namespace {

using ::testing::ElementsAre;

struct Task {
  int id = 0;
  absl::Time deadline = absl::InfiniteFuture();
  bool cancelled = false;
};

std::vector<int> Ids(const std::vector<Task>& tasks) {
  std::vector<int> ids;
  for (const Task& t : tasks) ids.push_back(t.id);
  return ids;
}

std::vector<Task> MakeTasks(int first_id, int n) {
  std::vector<Task> tasks;
  for (int i = 0; i < n; ++i) tasks.push_back(Task{first_id + i});
  return tasks;
}

class BatcherTest : public ::testing::Test {
 protected:
  using Batcher = DynamicBatcher<Task>;

  std::unique_ptr<Batcher> MakeBatcher(BatcherOptions options) {
    options.clock = &clock_;
    auto batcher = Batcher::Create(
        options,
        [](const Task& t, absl::Time now) {
          if (t.cancelled) return absl::CancelledError("client cancelled");
          if (now >= t.deadline) return absl::DeadlineExceededError("deadline passed in queue");
          return absl::OkStatus();
        },
        [this](Task t, absl::Status s) {
          absl::MutexLock lock(&mu_);
          dropped_.emplace_back(t.id, s.code());
        });
    EXPECT_TRUE(batcher.ok()) << batcher.status();
    return *std::move(batcher);
  }

  // Runs NextBatch() on another thread; the result is available after `done` is notified.
  struct PendingBatch {
    std::optional<Batcher::Batch> result;
    absl::Notification done;
    std::thread thread;
    ~PendingBatch() {
      if (thread.joinable()) thread.join();
    }
  };
  void StartNextBatch(Batcher* batcher, PendingBatch* pending) {
    pending->thread = std::thread([batcher, pending] {
      pending->result = batcher->NextBatch();
      pending->done.Notify();
    });
  }
  // Waits (in real time) until `n` threads sleep in the fake clock.
  void WaitForWaiters(int n) {
    while (clock_.num_waiters() < n) absl::SleepFor(absl::Microseconds(100));
  }

  FakeClock clock_;
  absl::Mutex mu_;
  std::vector<std::pair<int, absl::StatusCode>> dropped_;
};

TEST_F(BatcherTest, FlushesAsSoonAsBatchIsFull) {
  auto batcher = MakeBatcher({.max_batch_size = 4, .max_queue_delay = absl::Seconds(10)});
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(0, 4)).ok());
  // The clock never moves: only the size can have closed the batch.
  auto batch = batcher->NextBatch();
  ASSERT_TRUE(batch.has_value());
  EXPECT_THAT(Ids(batch->items), ElementsAre(0, 1, 2, 3));
  EXPECT_EQ(batch->padded_size, 4);
  EXPECT_EQ(batcher->queued_images(), 0);
}

TEST_F(BatcherTest, FullBatchWakesWaitingWorker) {
  auto batcher = MakeBatcher({.max_batch_size = 4, .max_queue_delay = absl::Seconds(10)});
  PendingBatch pending;
  StartNextBatch(batcher.get(), &pending);
  WaitForWaiters(1);
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(0, 2)).ok());
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(2, 2)).ok());
  pending.done.WaitForNotification();
  ASSERT_TRUE(pending.result.has_value());
  EXPECT_THAT(Ids(pending.result->items), ElementsAre(0, 1, 2, 3));
}

TEST_F(BatcherTest, FlushesPartialBatchWhenOldestItemReachesDelay) {
  auto batcher = MakeBatcher({.max_batch_size = 8, .max_queue_delay = absl::Milliseconds(5)});
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(0, 2)).ok());
  clock_.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(2, 1)).ok());
  PendingBatch pending;
  StartNextBatch(batcher.get(), &pending);
  WaitForWaiters(1);
  clock_.Advance(absl::Milliseconds(2));  // oldest has waited 4 ms < 5 ms
  WaitForWaiters(1);
  EXPECT_FALSE(pending.done.HasBeenNotified());
  clock_.Advance(absl::Milliseconds(1));  // oldest has waited 5 ms
  pending.done.WaitForNotification();
  ASSERT_TRUE(pending.result.has_value());
  EXPECT_THAT(Ids(pending.result->items), ElementsAre(0, 1, 2));
  EXPECT_EQ(pending.result->enqueue_times[0], absl::UnixEpoch());
  EXPECT_EQ(pending.result->enqueue_times[2], absl::UnixEpoch() + absl::Milliseconds(2));
}

TEST_F(BatcherTest, ZeroDelayHandsOutWhateverIsQueued) {
  auto batcher = MakeBatcher({.max_batch_size = 8, .max_queue_delay = absl::ZeroDuration()});
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(0, 3)).ok());
  auto batch = batcher->NextBatch();
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(batch->items.size(), 3u);
}

TEST_F(BatcherTest, AWorkersOwnCapClosesAndBoundsItsBatch) {
  auto batcher = MakeBatcher({.max_batch_size = 8, .max_queue_delay = absl::Seconds(10)});
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(0, 5)).ok());
  // The clock never moves and 5 < 8 items are queued: only the cap of 2 can close the batch.
  auto first = batcher->NextBatch(/*max_items=*/2);
  ASSERT_TRUE(first.has_value());
  EXPECT_THAT(Ids(first->items), ElementsAre(0, 1));
  // A cap above max_batch_size is bounded by it; 0 means max_batch_size.
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(5, 7)).ok());
  auto second = batcher->NextBatch(/*max_items=*/100);
  ASSERT_TRUE(second.has_value());
  EXPECT_THAT(Ids(second->items), ElementsAre(2, 3, 4, 5, 6, 7, 8, 9));
  EXPECT_EQ(batcher->queued_images(), 2);
}

TEST_F(BatcherTest, SplitsLargeRequestsAcrossBatches) {
  auto batcher = MakeBatcher({.max_batch_size = 4, .max_queue_delay = absl::Milliseconds(1)});
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(0, 6)).ok());
  auto first = batcher->NextBatch();
  ASSERT_TRUE(first.has_value());
  EXPECT_THAT(Ids(first->items), ElementsAre(0, 1, 2, 3));
  clock_.Advance(absl::Milliseconds(1));
  auto second = batcher->NextBatch();
  ASSERT_TRUE(second.has_value());
  EXPECT_THAT(Ids(second->items), ElementsAre(4, 5));
}

TEST_F(BatcherTest, RejectsWhenFullWithoutPartialEnqueue) {
  auto batcher = MakeBatcher({.max_batch_size = 2, .max_queued_images = 4});
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(0, 3)).ok());
  absl::Status s = batcher->Enqueue(0, MakeTasks(3, 2));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("queue full"));
  EXPECT_EQ(batcher->queued_images(), 3);  // all or nothing
  EXPECT_TRUE(batcher->Enqueue(0, MakeTasks(3, 1)).ok());
  EXPECT_EQ(batcher->Enqueue(0, MakeTasks(4, 1)).code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(BatcherTest, DropsExpiredAndCancelledItemsBeforeTheyReachABatch) {
  auto batcher = MakeBatcher({.max_batch_size = 4, .max_queue_delay = absl::Milliseconds(10)});
  std::vector<Task> tasks = MakeTasks(0, 4);
  tasks[1].deadline = absl::UnixEpoch() + absl::Milliseconds(5);   // expires while queued
  tasks[2].cancelled = true;                                       // client went away
  tasks[3].deadline = absl::UnixEpoch() + absl::Milliseconds(50);  // still alive
  ASSERT_TRUE(batcher->Enqueue(0, std::move(tasks)).ok());
  clock_.Advance(absl::Milliseconds(10));
  auto batch = batcher->NextBatch();
  ASSERT_TRUE(batch.has_value());
  EXPECT_THAT(Ids(batch->items), ElementsAre(0, 3));
  EXPECT_EQ(batch->padded_size, 2);
  absl::MutexLock lock(&mu_);
  EXPECT_THAT(dropped_, ElementsAre(std::make_pair(1, absl::StatusCode::kDeadlineExceeded),
                                    std::make_pair(2, absl::StatusCode::kCancelled)));
}

TEST_F(BatcherTest, BatchOfOnlyDroppedItemsIsNeverHandedOut) {
  auto batcher = MakeBatcher({.max_batch_size = 2, .max_queue_delay = absl::Milliseconds(1)});
  std::vector<Task> doomed = MakeTasks(0, 2);
  doomed[0].cancelled = doomed[1].cancelled = true;
  ASSERT_TRUE(batcher->Enqueue(0, std::move(doomed)).ok());
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(7, 1)).ok());
  clock_.Advance(absl::Milliseconds(1));
  auto batch = batcher->NextBatch();
  ASSERT_TRUE(batch.has_value());
  EXPECT_THAT(Ids(batch->items), ElementsAre(7));
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(dropped_.size(), 2u);
}

TEST_F(BatcherTest, ShutdownDrainsQueuedItemsThenEnds) {
  auto batcher = MakeBatcher({.max_batch_size = 4, .max_queue_delay = absl::Seconds(100)});
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(0, 3)).ok());
  batcher->Shutdown();
  EXPECT_EQ(batcher->Enqueue(0, MakeTasks(3, 1)).code(), absl::StatusCode::kUnavailable);
  auto batch = batcher->NextBatch();  // no clock movement needed while draining
  ASSERT_TRUE(batch.has_value());
  EXPECT_THAT(Ids(batch->items), ElementsAre(0, 1, 2));
  EXPECT_FALSE(batcher->NextBatch().has_value());
}

TEST_F(BatcherTest, ShutdownWakesIdleWorkers) {
  auto batcher = MakeBatcher({});
  PendingBatch a, b;
  StartNextBatch(batcher.get(), &a);
  StartNextBatch(batcher.get(), &b);
  WaitForWaiters(2);
  batcher->Shutdown();
  a.done.WaitForNotification();
  b.done.WaitForNotification();
  EXPECT_FALSE(a.result.has_value());
  EXPECT_FALSE(b.result.has_value());
}

TEST_F(BatcherTest, KeysNeverShareABatchAndOldestReadyKeyGoesFirst) {
  auto batcher = MakeBatcher({.max_batch_size = 4, .max_queue_delay = absl::Milliseconds(1)});
  ASSERT_TRUE(batcher->Enqueue(64, MakeTasks(0, 1)).ok());
  clock_.Advance(absl::Microseconds(10));
  ASSERT_TRUE(batcher->Enqueue(32, MakeTasks(10, 2)).ok());
  ASSERT_TRUE(batcher->Enqueue(64, MakeTasks(1, 1)).ok());
  clock_.Advance(absl::Milliseconds(2));
  auto first = batcher->NextBatch();
  auto second = batcher->NextBatch();
  ASSERT_TRUE(first.has_value() && second.has_value());
  EXPECT_EQ(first->key, 64);
  EXPECT_THAT(Ids(first->items), ElementsAre(0, 1));
  EXPECT_EQ(second->key, 32);
  EXPECT_THAT(Ids(second->items), ElementsAre(10, 11));
}

TEST_F(BatcherTest, PadsUpToTheNextAllowedBatchSize) {
  auto batcher = MakeBatcher({.max_batch_size = 8,
                              .max_queue_delay = absl::ZeroDuration(),
                              .allowed_batch_sizes = {1, 2, 4, 8}});
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(0, 3)).ok());
  auto batch = batcher->NextBatch();
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(batch->items.size(), 3u);
  EXPECT_EQ(batch->padded_size, 4);
  ASSERT_TRUE(batcher->Enqueue(0, MakeTasks(3, 5)).ok());
  batch = batcher->NextBatch();
  EXPECT_EQ(batch->padded_size, 8);
}

TEST(BatcherOptionsTest, RejectsBadOptionsNamingTheField) {
  auto check = [](BatcherOptions o, const std::string& field) {
    absl::Status s = ValidateBatcherOptions(o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr(field));
  };
  check({.max_batch_size = 0}, "max_batch_size");
  check({.max_queue_delay = -absl::Milliseconds(1)}, "max_queue_delay");
  check({.max_batch_size = 8, .max_queued_images = 4}, "max_queued_images");
  check({.max_batch_size = 8, .allowed_batch_sizes = {1, 4}}, "allowed_batch_sizes");
  check({.max_batch_size = 8, .allowed_batch_sizes = {4, 2, 8}}, "allowed_batch_sizes");
  EXPECT_TRUE(ValidateBatcherOptions({}).ok());
  EXPECT_FALSE(DynamicBatcher<Task>::Create({.max_batch_size = 0}, nullptr, nullptr).ok());
}

// Many producers and consumers on the real clock: every item comes out exactly once, in batches
// never larger than the limit.
TEST(BatcherStressTest, EveryItemIsDeliveredExactlyOnce) {
  auto created = DynamicBatcher<Task>::Create(
      {.max_batch_size = 5, .max_queue_delay = absl::Microseconds(200), .max_queued_images = 10000},
      nullptr, nullptr);
  ASSERT_TRUE(created.ok());
  auto& batcher = *created;
  constexpr int kProducers = 4, kPerProducer = 500, kConsumers = 3;
  absl::Mutex mu;
  std::multiset<int> seen;
  std::atomic<bool> oversized{false};
  std::vector<std::thread> consumers;
  for (int c = 0; c < kConsumers; ++c) {
    consumers.emplace_back([&] {
      while (auto batch = batcher->NextBatch()) {
        if (batch->items.size() > 5) oversized = true;
        absl::MutexLock lock(&mu);
        for (const Task& t : batch->items) seen.insert(t.id);
      }
    });
  }
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      for (int i = 0; i < kPerProducer; ++i) {
        ASSERT_TRUE(batcher->Enqueue(i % 3, MakeTasks(p * kPerProducer + i, 1)).ok());
      }
    });
  }
  for (auto& t : producers) t.join();
  batcher->Shutdown();
  for (auto& t : consumers) t.join();
  EXPECT_FALSE(oversized);
  ASSERT_EQ(seen.size(), static_cast<size_t>(kProducers * kPerProducer));
  for (int id = 0; id < kProducers * kPerProducer; ++id) EXPECT_EQ(seen.count(id), 1u) << id;
}

TEST_F(BatcherTest, CancelQueuedHandsEveryQueuedItemToTheDropCallback) {
  auto batcher = MakeBatcher({.max_batch_size = 2, .max_queue_delay = absl::Seconds(10)});
  ASSERT_TRUE(batcher->Enqueue(1, MakeTasks(0, 3)).ok());
  ASSERT_TRUE(batcher->Enqueue(2, MakeTasks(10, 2)).ok());
  std::optional<Batcher::Batch> running = batcher->NextBatch();  // a full batch: 0, 1 (key 1)
  ASSERT_TRUE(running.has_value());
  batcher->Shutdown();
  EXPECT_EQ(batcher->CancelQueued(absl::CancelledError("drain grace ended")), 3);
  EXPECT_EQ(batcher->queued_images(), 0);
  {
    absl::MutexLock lock(&mu_);
    std::vector<int> ids;
    for (const auto& [id, code] : dropped_) {
      ids.push_back(id);
      EXPECT_EQ(code, absl::StatusCode::kCancelled) << id;
    }
    std::sort(ids.begin(), ids.end());
    EXPECT_THAT(ids, ElementsAre(2, 10, 11));
  }
  EXPECT_FALSE(batcher->NextBatch().has_value());  // drained: the workers stop
  EXPECT_THAT(Ids(running->items), ElementsAre(0, 1));
}

}  // namespace
}  // namespace dmdserve
