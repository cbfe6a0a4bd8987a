// The TSan build's absl::Mutex annotations (tsan_absl_mutex.cc) at work: data handed from one
// thread to another through each abseil primitive our code uses is not reported as a race (without
// the annotations each of these tests is: TSan ends the process with a report), and a real race
// still is. Built only with DMDSERVE_SANITIZE=thread.
#include <cstdlib>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace {

// Plain (non-atomic) data written by one thread and read by another.
struct Handoff {
  absl::Mutex mu;
  bool ready = false;  // guarded by mu
  int payload[4] = {};  // written before `ready` is set, read after it is seen
};

void Publish(Handoff& h) {
  for (int i = 0; i < 4; ++i) h.payload[i] = i + 1;
  absl::MutexLock lock(&h.mu);
  h.ready = true;
}

void ExpectPayload(const Handoff& h) {
  for (int i = 0; i < 4; ++i) EXPECT_EQ(h.payload[i], i + 1);
}

TEST(TsanAbslMutexTest, LockAndUnlockOrderAccesses) {
  Handoff h;
  std::thread writer([&] { Publish(h); });
  for (bool ready = false; !ready;) {
    absl::MutexLock lock(&h.mu);
    ready = h.ready;
  }
  ExpectPayload(h);
  writer.join();
}

TEST(TsanAbslMutexTest, AwaitAndLockWhenOrderAccesses) {
  Handoff first, second;
  std::thread writer([&] {
    Publish(first);
    Publish(second);
  });
  {
    absl::MutexLock lock(&first.mu);
    first.mu.Await(absl::Condition(&first.ready));
  }
  ExpectPayload(first);
  second.mu.LockWhenWithTimeout(absl::Condition(&second.ready), absl::Minutes(1));
  second.mu.Unlock();
  ExpectPayload(second);
  writer.join();
}

TEST(TsanAbslMutexTest, AwaitWithTimeoutOrdersAccesses) {
  Handoff h;
  std::thread writer([&] { Publish(h); });
  {
    absl::MutexLock lock(&h.mu);
    ASSERT_TRUE(h.mu.AwaitWithTimeout(absl::Condition(&h.ready), absl::Minutes(1)));
  }
  ExpectPayload(h);
  writer.join();
}

TEST(TsanAbslMutexTest, CondVarWaitsOrderAccesses) {
  Handoff first, second;
  absl::CondVar cv;
  std::thread writer([&] {
    Publish(first);
    cv.SignalAll();
    Publish(second);
    cv.SignalAll();
  });
  {
    absl::MutexLock lock(&first.mu);
    while (!first.ready) cv.Wait(&first.mu);
  }
  ExpectPayload(first);
  {
    absl::MutexLock lock(&second.mu);
    while (!second.ready) cv.WaitWithTimeout(&second.mu, absl::Milliseconds(10));
  }
  ExpectPayload(second);
  writer.join();
}

TEST(TsanAbslMutexTest, NotificationOrdersAccesses) {
  int waited_for[4] = {};
  int polled[4] = {};
  absl::Notification waited, polled_done;
  std::thread writer([&] {
    for (int i = 0; i < 4; ++i) waited_for[i] = polled[i] = i + 1;
    waited.Notify();
    polled_done.Notify();
  });
  waited.WaitForNotification();
  for (int i = 0; i < 4; ++i) EXPECT_EQ(waited_for[i], i + 1);
  while (!polled_done.HasBeenNotified()) absl::SleepFor(absl::Milliseconds(1));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(polled[i], i + 1);
  writer.join();
}

// Two threads increment a counter, only one of them under the mutex: TSan still reports it.
void RaceOnACounter() {
  absl::Mutex mu;
  int counter = 0;
  std::thread other([&] {
    for (int i = 0; i < 1000; ++i) ++counter;
  });
  for (int i = 0; i < 1000; ++i) {
    absl::MutexLock lock(&mu);
    ++counter;
  }
  other.join();
  std::exit(counter > 0 ? 0 : 1);
}

TEST(TsanAbslMutexTest, ARealRaceIsStillReported) {
  // The child reports to stderr (not the run's log_path) and exits with TSan's exit code.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  setenv("TSAN_OPTIONS", "halt_on_error=1:exitcode=66:report_signal_unsafe=0", 1);
  EXPECT_EXIT(RaceOnACounter(), ::testing::ExitedWithCode(66), "ThreadSanitizer: data race");
}

}  // namespace
