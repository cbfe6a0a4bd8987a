// The TSan build's absl::Status reference count (tsan_absl_status.cc) at work: a status whose last
// reference is dropped on another thread than the one that took a reference is not reported as a
// race (without tsan_absl_status.cc this test is: TSan ends the process with a report), and a real
// use after free of a status's message still is. Built only with DMDSERVE_SANITIZE=thread.
#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"

namespace {

// Waits for `flag` with relaxed loads only, which give TSan no order between the threads: what
// orders them must be the status's own reference count.
void SpinUntil(const std::atomic<bool>& flag) {
  while (!flag.load(std::memory_order_relaxed)) std::this_thread::yield();
}

// As in the engine: a worker copies a failed batch's status for a request and drops its copies;
// the request's owner later drops the last reference, which frees the shared representation.
TEST(TsanAbslStatusTest, LastReferenceDroppedOnAnotherThread) {
  absl::Status owner = absl::InternalError("batch failed");
  absl::Status handed = owner;
  std::atomic<bool> dropped{false};
  std::thread worker([&dropped, handed = std::move(handed)]() mutable {
    absl::Status copy = handed;  // a reference taken on this thread
    EXPECT_EQ(copy.code(), absl::StatusCode::kInternal);
    EXPECT_EQ(copy.message(), "batch failed");
    copy = absl::OkStatus();
    handed = absl::OkStatus();
    dropped.store(true, std::memory_order_relaxed);
  });
  SpinUntil(dropped);
  owner = absl::OkStatus();  // the last reference: frees what the worker touched
  worker.join();
}

// Reads a status's message on another thread while this thread frees it: a real race, which the
// instrumented reference count must not hide.
void UseAfterLastReference() {
  absl::Status owner = absl::InternalError("batch failed");
  absl::string_view message = owner.message();
  std::atomic<bool> read{false};
  std::thread reader([&] {
    std::string copy(message);
    read.store(copy.size() > 0, std::memory_order_relaxed);
  });
  SpinUntil(read);
  owner = absl::OkStatus();
  reader.join();
  std::exit(0);
}

TEST(TsanAbslStatusTest, ARealRaceIsStillReported) {
  // The child reports to stderr (not the run's log_path) and exits with TSan's exit code.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  setenv("TSAN_OPTIONS", "halt_on_error=1:exitcode=66:report_signal_unsafe=0", 1);
  EXPECT_EXIT(UseAfterLastReference(), ::testing::ExitedWithCode(66), "ThreadSanitizer: data race");
}

}  // namespace
