#include "worker/batch_size_tuner.h"

#include <map>
#include <set>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/clock.h"

namespace dmdserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

MATCHER_P2(CostIs, batch_size, images_per_second, "") {
  return arg.batch_size == batch_size && std::abs(arg.images_per_second - images_per_second) < 1e-6;
}

TEST(ChooseBatchSizeTest, StopsWhereThePerImageCostStopsFalling) {
  // The development machine's fashion-dmd curve: batch 4 is the cheapest per image.
  EXPECT_EQ(ChooseBatchSize({{1, 204}, {2, 267}, {4, 331}, {8, 231}, {16, 136}}, 0.03), 4);
}

TEST(ChooseBatchSizeTest, AGainBelowMinGainDoesNotBuyLatency) {
  EXPECT_EQ(ChooseBatchSize({{1, 100}, {2, 102}, {4, 300}}, 0.03), 1);
  EXPECT_EQ(ChooseBatchSize({{1, 100}, {2, 102}, {4, 300}}, 0.0), 4);
}

TEST(ChooseBatchSizeTest, KeepsGrowingWhileEachStepPays) {
  // A GPU: every larger batch is cheaper per image.
  EXPECT_EQ(ChooseBatchSize({{1, 10}, {2, 19}, {4, 36}, {8, 70}, {16, 130}}, 0.03), 16);
  EXPECT_EQ(ChooseBatchSize({{8, 1}}, 0.03), 8);
  EXPECT_EQ(ChooseBatchSize({}, 0.03), 0);
}

// A fake device whose batch of b images takes cost_ms[b] of fake time.
struct FakeDevice {
  FakeClock clock;
  std::map<int, double> cost_ms;
  absl::Mutex mu;
  std::map<int, int> runs;  // batch size -> runs
  std::set<std::thread::id> threads;

  RunBatchFn Run() {
    return [this](int batch_size) {
      {
        absl::MutexLock lock(&mu);
        ++runs[batch_size];
        threads.insert(std::this_thread::get_id());
      }
      clock.Advance(absl::Milliseconds(cost_ms.at(batch_size)));
      return absl::OkStatus();
    };
  }
};

TEST(TuneBatchSizeTest, MeasuresAscendingAndSkipsSizesPastTheKnee) {
  FakeDevice device;
  // images/s: 1 -> 100, 2 -> 200, 4 -> 250, 8 -> 160 (16 never runs).
  device.cost_ms = {{1, 10}, {2, 10}, {4, 16}, {8, 50}, {16, 1}};
  BatchTuningOptions options{
      .batch_sizes = {1, 2, 4, 8, 16}, .min_time = absl::Milliseconds(100), .clock = &device.clock};
  absl::StatusOr<BatchSizeChoice> choice = TuneBatchSize(options, device.Run());
  ASSERT_TRUE(choice.ok()) << choice.status();
  EXPECT_EQ(choice->max_batch_size, 4);
  EXPECT_THAT(choice->measured,
              ElementsAre(CostIs(1, 100), CostIs(2, 200), CostIs(4, 250), CostIs(8, 160)));
  EXPECT_EQ(device.runs[1], 10);  // until 100 ms of fake time had passed
  EXPECT_EQ(device.runs[8], 2);
  EXPECT_EQ(device.runs.count(16), 0);
  EXPECT_EQ(choice->Describe(), "1: 100.0, 2: 200.0, 4: 250.0, 8: 160.0 images/s -> 4");
}

TEST(TuneBatchSizeTest, MinRunsHoldsForSlowBatches) {
  FakeDevice device;
  device.cost_ms = {{1, 1000}};
  BatchTuningOptions options{.batch_sizes = {1}, .min_runs = 3, .clock = &device.clock};
  absl::StatusOr<BatchSizeChoice> choice = TuneBatchSize(options, device.Run());
  ASSERT_TRUE(choice.ok()) << choice.status();
  EXPECT_EQ(device.runs[1], 3);
  EXPECT_EQ(choice->max_batch_size, 1);
}

TEST(TuneBatchSizeTest, RunsFromConcurrencyThreadsAtOnce) {
  FakeDevice device;
  device.cost_ms = {{1, 10}, {2, 10}};
  BatchTuningOptions options{
      .batch_sizes = {1, 2}, .concurrency = 3, .min_runs = 2, .clock = &device.clock};
  absl::StatusOr<BatchSizeChoice> choice = TuneBatchSize(options, device.Run());
  ASSERT_TRUE(choice.ok()) << choice.status();
  EXPECT_EQ(device.threads.size(), 3u);
  EXPECT_GE(device.runs[1], 6);
  EXPECT_EQ(choice->max_batch_size, 2);
}

TEST(TuneBatchSizeTest, AFailedRunEndsTheTuningNamingTheBatchSize) {
  FakeClock clock;
  BatchTuningOptions options{.batch_sizes = {1, 2}, .clock = &clock};
  absl::StatusOr<BatchSizeChoice> choice = TuneBatchSize(options, [&](int batch_size) {
    clock.Advance(absl::Milliseconds(300));
    return batch_size == 2 ? absl::ResourceExhaustedError("out of memory") : absl::OkStatus();
  });
  EXPECT_EQ(choice.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(choice.status().message(), HasSubstr("batch size 2: out of memory"));
}

TEST(TuneBatchSizeTest, BadOptionsAreNamed) {
  const RunBatchFn run = [](int) { return absl::OkStatus(); };
  const auto message = [&](BatchTuningOptions o) {
    return std::string(TuneBatchSize(o, run).status().message());
  };
  EXPECT_THAT(message({}), HasSubstr("batch_sizes"));
  EXPECT_THAT(message({.batch_sizes = {2, 1}}), HasSubstr("ascending"));
  EXPECT_THAT(message({.batch_sizes = {0}}), HasSubstr("batch_sizes"));
  EXPECT_THAT(message({.batch_sizes = {1}, .concurrency = 0}), HasSubstr("concurrency"));
  EXPECT_THAT(message({.batch_sizes = {1}, .min_runs = 0}), HasSubstr("min_runs"));
  EXPECT_THAT(message({.batch_sizes = {1}, .min_gain = -1}), HasSubstr("min_gain"));
}

}  // namespace
}  // namespace dmdserve
