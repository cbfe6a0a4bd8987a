// Engine tests on the real tiny TorchScript bundle (models/tiny-random): no fakes.
#include "worker/engine.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/clip_tokenizer.h"
#include "worker/device.h"
#include "worker/model_manifest.h"
#include "worker/pipeline.h"
#include "worker/test_util.h"
#include "worker/testing/png_decode.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

const std::string kTinyBundle = std::string(DMDSERVE_SOURCE_DIR) + "/models/tiny-random";

// Collects the outcome of one Submit.
struct Outcome {
  absl::Notification done;
  absl::Status status;
  GenerateResult result;
  std::vector<GeneratedImage> streamed;
  bool image_after_done = false;

  GenerateCallbacks Callbacks(bool stream = false) {
    GenerateCallbacks cb;
    cb.on_done = [this](absl::Status s, GenerateResult r) {
      status = std::move(s);
      result = std::move(r);
      done.Notify();
    };
    if (stream) {
      cb.on_image = [this](GeneratedImage image, const GenerateResult&) {
        if (done.HasBeenNotified()) image_after_done = true;
        streamed.push_back(std::move(image));
      };
    }
    return cb;
  }
};

std::unique_ptr<Engine> MakeEngine(Engine::Options options, bool warm = true) {
  if (options.model_dirs.empty()) options.model_dirs = {kTinyBundle};
  auto engine = Engine::Create(std::move(options));
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return nullptr;
  if (warm) EXPECT_TRUE((*engine)->Warmup().ok());
  return *std::move(engine);
}

GenerateParams Params(std::string prompt, int n, uint64_t seed) {
  GenerateParams p;
  p.prompt = std::move(prompt);
  p.num_images = n;
  p.seed = seed;
  return p;
}

std::string Pixels(const GeneratedImage& image) {
  absl::StatusOr<DecodedImage> decoded = DecodePng(image.data);
  EXPECT_TRUE(decoded.ok()) << decoded.status();
  return decoded.ok() ? decoded->pixels : "";
}

TEST(EngineTest, GeneratesPngImagesWithConsecutiveSeeds) {
  auto engine = MakeEngine({});
  ASSERT_NE(engine, nullptr);
  const ModelInfo info = engine->ListModels().at(0);
  Outcome out;
  ASSERT_TRUE(engine->Submit(Params("a photo of a sneaker", 3, 41), out.Callbacks()).ok());
  out.done.WaitForNotification();
  ASSERT_TRUE(out.status.ok()) << out.status;
  EXPECT_EQ(out.result.model, info.name);
  ASSERT_EQ(out.result.images.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    const GeneratedImage& image = out.result.images[i];
    EXPECT_EQ(image.index, i);
    EXPECT_EQ(image.seed, 41u + i);
    EXPECT_EQ(image.width, info.width);
    EXPECT_EQ(image.height, info.height);
    absl::StatusOr<DecodedImage> decoded = DecodePng(image.data);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(decoded->width, info.width);
    EXPECT_EQ(decoded->height, info.height);
    EXPECT_EQ(decoded->channels, info.channels);
  }
  EXPECT_NE(Pixels(out.result.images[0]), Pixels(out.result.images[1]));
  EXPECT_GE(out.result.timings.batch_size, 1);
  EXPECT_GE(out.result.timings.total, out.result.timings.queue);
}

TEST(EngineTest, RawEncodingReturnsHwcPixelsEqualToThePngContent) {
  auto engine = MakeEngine({});
  ASSERT_NE(engine, nullptr);
  Outcome png, raw;
  GenerateParams p = Params("trainers", 1, 7);
  ASSERT_TRUE(engine->Submit(p, png.Callbacks()).ok());
  p.encoding = ImageEncoding::kRaw;
  ASSERT_TRUE(engine->Submit(p, raw.Callbacks()).ok());
  png.done.WaitForNotification();
  raw.done.WaitForNotification();
  ASSERT_TRUE(png.status.ok() && raw.status.ok());
  const GeneratedImage& r = raw.result.images.at(0);
  EXPECT_EQ(r.encoding, ImageEncoding::kRaw);
  EXPECT_EQ(r.data.size(), static_cast<size_t>(r.width * r.height * r.channels));
  EXPECT_EQ(r.data, Pixels(png.result.images.at(0)));
}

TEST(EngineTest, AbsentSeedIsDrawnAndReported) {
  auto engine = MakeEngine({});
  ASSERT_NE(engine, nullptr);
  Outcome a, b;
  GenerateParams p = Params("a handbag", 2, 0);
  p.seed.reset();
  ASSERT_TRUE(engine->Submit(p, a.Callbacks()).ok());
  ASSERT_TRUE(engine->Submit(p, b.Callbacks()).ok());
  a.done.WaitForNotification();
  b.done.WaitForNotification();
  ASSERT_TRUE(a.status.ok() && b.status.ok());
  EXPECT_EQ(a.result.images[1].seed, a.result.images[0].seed + 1);
  EXPECT_NE(a.result.images[0].seed, b.result.images[0].seed);
}

// The same model + prompt + seed gives the same image alone and inside a full batch of others.
TEST(EngineTest, ImageDependsOnlyOnPromptAndSeedNotOnBatchmates) {
  // A fixed batch cap: the warm-up measurement may choose 1 for the tiny model, and the test
  // needs the probe to share a batch: the seven submits must land within the queue delay, also
  // on a loaded machine or under a sanitizer.
  auto engine = MakeEngine({.max_batch_size = 8, .max_queue_delay = absl::Milliseconds(500)});
  ASSERT_NE(engine, nullptr);
  Outcome alone;
  ASSERT_TRUE(engine->Submit(Params("an ankle boot", 1, 1234), alone.Callbacks()).ok());
  alone.done.WaitForNotification();
  ASSERT_TRUE(alone.status.ok());

  std::vector<std::unique_ptr<Outcome>> crowd;
  for (int i = 0; i < 7; ++i) {
    crowd.push_back(std::make_unique<Outcome>());
    const std::string prompt = i == 3 ? "an ankle boot" : absl::StrCat("a pullover ", i);
    const uint64_t seed = i == 3 ? 1234 : 100 + i;
    ASSERT_TRUE(engine->Submit(Params(prompt, 1, seed), crowd.back()->Callbacks()).ok());
  }
  for (auto& o : crowd) o->done.WaitForNotification();
  ASSERT_TRUE(crowd[3]->status.ok());
  EXPECT_GT(crowd[3]->result.timings.batch_size, 1);  // it really shared a batch
  const std::string a = Pixels(alone.result.images[0]);
  const std::string b = Pixels(crowd[3]->result.images[0]);
  ASSERT_EQ(a.size(), b.size());
  int max_diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(static_cast<int>(static_cast<uint8_t>(a[i])) -
                                           static_cast<int>(static_cast<uint8_t>(b[i]))));
  }
  EXPECT_LE(max_diff, 1);
}

TEST(EngineTest, StreamsEveryImageBeforeDone) {
  auto engine = MakeEngine({});
  ASSERT_NE(engine, nullptr);
  Outcome out;
  ASSERT_TRUE(engine->Submit(Params("a shirt", 4, 5), out.Callbacks(/*stream=*/true)).ok());
  out.done.WaitForNotification();
  ASSERT_TRUE(out.status.ok());
  EXPECT_TRUE(out.result.images.empty());
  ASSERT_EQ(out.streamed.size(), 4u);
  EXPECT_FALSE(out.image_after_done);
  std::set<int> indices;
  for (const GeneratedImage& image : out.streamed) indices.insert(image.index);
  EXPECT_EQ(indices, (std::set<int>{0, 1, 2, 3}));
}

TEST(EngineTest, RejectsBadRequestsNamingTheField) {
  auto engine = MakeEngine({});
  ASSERT_NE(engine, nullptr);
  const ModelInfo info = engine->ListModels().at(0);
  Outcome unused;
  auto submit = [&](GenerateParams p) { return engine->Submit(std::move(p), unused.Callbacks()); };

  GenerateParams p = Params("x", 1, 1);
  p.model = "no-such-model";
  absl::Status s = submit(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(info.name));  // lists what is served

  s = submit(Params("x", info.max_images_per_request + 1, 1));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("num_images"));

  p = Params("x", 1, 1);
  p.width = info.width + 1;
  p.height = info.height;
  s = submit(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("width x height"));

  s = submit(Params("bad \xC3\x28 utf8", 1, 1));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("prompt"));
  EXPECT_FALSE(unused.done.HasBeenNotified());  // a rejected Submit calls no callback
}

TEST(EngineTest, NotReadyUntilWarmedUp) {
  auto engine = MakeEngine({}, /*warm=*/false);
  ASSERT_NE(engine, nullptr);
  EXPECT_FALSE(engine->ready());
  EXPECT_FALSE(engine->ListModels()[0].ready);
  Outcome out;
  EXPECT_EQ(engine->Submit(Params("x", 1, 1), out.Callbacks()).code(),
            absl::StatusCode::kUnavailable);
  ASSERT_TRUE(engine->Warmup().ok());
  EXPECT_TRUE(engine->ready());
  EXPECT_TRUE(engine->ListModels()[0].ready);
}

TEST(EngineTest, FullQueueRejectsAtOnceWhileAcceptedRequestsComplete) {
  auto engine = MakeEngine({.max_batch_size = 1, .max_queued_images = 4});
  ASSERT_NE(engine, nullptr);
  std::vector<std::unique_ptr<Outcome>> accepted;
  int rejected = 0;
  for (int i = 0; i < 40; ++i) {
    auto out = std::make_unique<Outcome>();
    absl::Status s = engine->Submit(Params("a coat", 2, i), out->Callbacks());
    if (s.ok()) {
      accepted.push_back(std::move(out));
    } else {
      EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 0);
  for (auto& o : accepted) {
    o->done.WaitForNotification();
    EXPECT_TRUE(o->status.ok()) << o->status;
  }
}

TEST(EngineTest, ImagesPerRequestNeverExceedTheQueue) {
  auto engine = MakeEngine({.max_batch_size = 1, .max_queued_images = 3}, /*warm=*/true);
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->ListModels()[0].max_images_per_request, 3);
  Outcome out;
  absl::Status s = engine->Submit(Params("a coat", 4, 1), out.Callbacks());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);  // not a retryable queue-full
  EXPECT_THAT(std::string(s.message()), HasSubstr("num_images is 4"));
}

TEST(EngineTest, ExpiredAndCancelledRequestsNeverRun) {
  auto engine = MakeEngine({});
  ASSERT_NE(engine, nullptr);
  Outcome expired, cancelled;
  GenerateParams p = Params("a sandal", 2, 3);
  p.deadline = absl::Now() - absl::Seconds(1);
  ASSERT_TRUE(engine->Submit(p, expired.Callbacks()).ok());
  GenerateCallbacks cb = cancelled.Callbacks();
  cb.is_cancelled = [] { return true; };
  ASSERT_TRUE(engine->Submit(Params("a sandal", 2, 3), std::move(cb)).ok());
  expired.done.WaitForNotification();
  cancelled.done.WaitForNotification();
  EXPECT_EQ(expired.status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(cancelled.status.code(), absl::StatusCode::kCancelled);
}

TEST(EngineTest, ShutdownFinishesEveryAcceptedRequestThenRejects) {
  auto engine = MakeEngine({.max_queued_images = 1000});
  ASSERT_NE(engine, nullptr);
  std::vector<std::unique_ptr<Outcome>> outs;
  for (int i = 0; i < 20; ++i) {
    outs.push_back(std::make_unique<Outcome>());
    ASSERT_TRUE(engine->Submit(Params("a dress", 3, i), outs.back()->Callbacks()).ok());
  }
  engine->Shutdown();
  for (auto& o : outs) {
    ASSERT_TRUE(o->done.HasBeenNotified());
    EXPECT_TRUE(o->status.ok()) << o->status;
    EXPECT_EQ(o->result.images.size(), 3u);
  }
  Outcome late;
  EXPECT_EQ(engine->Submit(Params("late", 1, 1), late.Callbacks()).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_FALSE(engine->ready());
}

TEST(EngineTest, TokenizeMatchesTheTokenizer) {
  auto engine = MakeEngine({}, /*warm=*/false);
  ASSERT_NE(engine, nullptr);
  absl::StatusOr<TokenizeResult> t = engine->Tokenize("", "a photo of a cat");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->ids, (std::vector<int32_t>{320, 1125, 539, 320, 2368}));
  EXPECT_EQ(t->tokens,
            (std::vector<std::string>{"a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"}));
  EXPECT_EQ(t->input_ids.size(), 77u);
  EXPECT_EQ(t->truncated_tokens, 0);
  EXPECT_EQ(engine->Tokenize("nope", "x").status().code(), absl::StatusCode::kNotFound);
}

TEST(EngineTest, RejectsBadOptionsAndBundles) {
  EXPECT_EQ(Engine::Create({}).status().code(), absl::StatusCode::kInvalidArgument);
  auto s = Engine::Create({.model_dirs = {kTinyBundle}, .instances_per_device = -1}).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("instances_per_device"));
  s = Engine::Create({.model_dirs = {kTinyBundle}, .batch_tuning_time = absl::Milliseconds(-1)})
          .status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("batch_tuning_time"));
  s = Engine::Create({.model_dirs = {"/nonexistent/bundle"}}).status();
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("/nonexistent/bundle"));
  s = Engine::Create({.model_dirs = {kTinyBundle, kTinyBundle}}).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("already served"));
  s = Engine::Create({.model_dirs = {kTinyBundle}, .default_model = "other"}).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("default_model"));
}

// A model failure fails the requests of that batch with INTERNAL; the worker keeps serving, and
// the other model is unaffected.
TEST(EngineTest, ModelFailureFailsOnlyItsBatchAndWorkersKeepGoing) {
  auto tokenizer = ClipTokenizer::Create({.vocab_path = kTinyBundle + "/tokenizer/vocab.json",
                                          .merges_path = kTinyBundle + "/tokenizer/merges.txt"});
  ASSERT_TRUE(tokenizer.ok());
  absl::StatusOr<std::vector<int32_t>> boom = (*tokenizer)->Encode("boom");
  ASSERT_TRUE(boom.ok() && boom->size() == 1);
  const std::string dir = ::dmdserve::testing::MakeTempDir() + "/faulty-bundle";
  const std::string cmd = absl::StrCat(DMDSERVE_PYTHON, " ", DMDSERVE_SOURCE_DIR,
                                       "/tests/fixtures/make_faulty_bundle.py --src ", kTinyBundle,
                                       " --out ", dir, " --trigger-id ", (*boom)[0]);
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;

  auto engine = MakeEngine({.model_dirs = {dir, kTinyBundle}});
  ASSERT_NE(engine, nullptr);
  Outcome bad, good, other;
  GenerateParams p = Params("boom", 2, 1);
  p.model = "faulty";
  ASSERT_TRUE(engine->Submit(p, bad.Callbacks()).ok());
  bad.done.WaitForNotification();
  EXPECT_EQ(bad.status.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(bad.status.message()), HasSubstr("faulty"));
  EXPECT_THAT(std::string(bad.status.message()), Not(HasSubstr("/")));  // no internal paths

  p = Params("a bag", 2, 1);
  p.model = "faulty";
  ASSERT_TRUE(engine->Submit(p, good.Callbacks()).ok());
  p.model = engine->ListModels().at(1).name;  // the healthy model
  ASSERT_TRUE(engine->Submit(p, other.Callbacks()).ok());
  good.done.WaitForNotification();
  other.done.WaitForNotification();
  EXPECT_TRUE(good.status.ok()) << good.status;
  EXPECT_TRUE(other.status.ok()) << other.status;
}

// The id of `word`'s single token in the tiny bundle's CLIP vocabulary.
int32_t TokenId(const std::string& word) {
  auto tokenizer = ClipTokenizer::Create({.vocab_path = kTinyBundle + "/tokenizer/vocab.json",
                                          .merges_path = kTinyBundle + "/tokenizer/merges.txt"});
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  if (!tokenizer.ok()) return -1;
  absl::StatusOr<std::vector<int32_t>> ids = (*tokenizer)->Encode(word);
  EXPECT_TRUE(ids.ok() && ids->size() == 1) << word;
  return ids.ok() && ids->size() == 1 ? ids->front() : -1;
}

// A batch that runs out of memory (a real allocation failure: the fixture's text encoder asks for
// 1 PiB on the trigger token) fails its requests with RESOURCE_EXHAUSTED; the worker goes on.
TEST(EngineTest, OutOfMemoryFailsItsBatchWithResourceExhaustedAndWorkersKeepGoing) {
  const std::string dir = ::dmdserve::testing::MakeTempDir() + "/oom-bundle";
  const std::string cmd =
      absl::StrCat(DMDSERVE_PYTHON, " ", DMDSERVE_SOURCE_DIR,
                   "/tests/fixtures/make_faulty_bundle.py --fault oom --src ", kTinyBundle,
                   " --out ", dir, " --trigger-id ", TokenId("boom"));
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  // A fixed batch cap, so that the request's 2 images ride in one batch whatever the warm-up
  // measurement would choose.
  auto engine = MakeEngine({.model_dirs = {dir}, .max_batch_size = 2});
  ASSERT_NE(engine, nullptr);
  Outcome oom, fine;
  ASSERT_TRUE(engine->Submit(Params("boom", 2, 1), oom.Callbacks()).ok());
  oom.done.WaitForNotification();
  EXPECT_EQ(oom.status.code(), absl::StatusCode::kResourceExhausted) << oom.status;
  EXPECT_THAT(std::string(oom.status.message()),
              HasSubstr("model 'oom' ran out of device memory on a batch of 2 image(s)"));
  ASSERT_TRUE(engine->Submit(Params("a bag", 2, 1), fine.Callbacks()).ok());
  fine.done.WaitForNotification();
  EXPECT_TRUE(fine.status.ok()) << fine.status;
}

// Records the batch sizes the engine chooses and the batches it runs.
class BatchListener : public EngineListener {
 public:
  void OnBatchSizeChosen(std::string_view model, std::string_view device,
                         int max_batch_size) override {
    absl::MutexLock lock(&mu_);
    chosen_[std::string(model) + "@" + std::string(device)] = max_batch_size;
  }
  void OnBatchDone(const BatchStats& stats) override {
    absl::MutexLock lock(&mu_);
    largest_batch_ = std::max(largest_batch_, stats.images);
  }
  std::map<std::string, int> chosen() {
    absl::MutexLock lock(&mu_);
    return chosen_;
  }
  int largest_batch() {
    absl::MutexLock lock(&mu_);
    return largest_batch_;
  }

 private:
  absl::Mutex mu_;
  std::map<std::string, int> chosen_ ABSL_GUARDED_BY(mu_);
  int largest_batch_ ABSL_GUARDED_BY(mu_) = 0;
};

TEST(EngineTest, WarmupMeasuresBatchSizesAndWorkersKeepToTheChoice) {
  BatchListener listener;  // before the engine: it must outlive it (Shutdown still reports)
  auto engine = MakeEngine({}, /*warm=*/false);
  ASSERT_NE(engine, nullptr);
  EXPECT_THAT(engine->ListModels().at(0).batching, IsEmpty());  // not measured yet
  engine->SetListener(&listener);
  ASSERT_TRUE(engine->Warmup().ok());
  const ModelInfo info = engine->ListModels().at(0);
  ASSERT_EQ(info.batching.size(), 1u);
  const DeviceBatching& batching = info.batching[0];
  EXPECT_EQ(batching.device, "cpu");
  ASSERT_FALSE(batching.measured.empty());
  // Ascending manifest batch sizes from 1, each with a throughput, and the rule's choice.
  EXPECT_EQ(batching.measured[0].batch_size, 1);
  for (size_t i = 0; i < batching.measured.size(); ++i) {
    EXPECT_GT(batching.measured[i].images_per_second, 0);
    if (i > 0) EXPECT_GT(batching.measured[i].batch_size, batching.measured[i - 1].batch_size);
  }
  EXPECT_EQ(batching.max_batch_size, ChooseBatchSize(batching.measured, 0.03));
  EXPECT_EQ(listener.chosen(), (std::map<std::string, int>{
                                   {absl::StrCat(info.name, "@cpu"), batching.max_batch_size}}));
  // Under load no batch is larger than the choice.
  std::vector<std::unique_ptr<Outcome>> outs;
  for (int i = 0; i < 4; ++i) {
    outs.push_back(std::make_unique<Outcome>());
    ASSERT_TRUE(engine->Submit(Params("a coat", 8, i), outs.back()->Callbacks()).ok());
  }
  for (auto& o : outs) {
    o->done.WaitForNotification();
    EXPECT_TRUE(o->status.ok()) << o->status;
  }
  EXPECT_GE(listener.largest_batch(), 1);
  EXPECT_LE(listener.largest_batch(), batching.max_batch_size);
}

TEST(EngineTest, AConfiguredMaxBatchSizeIsUsedUnmeasured) {
  BatchListener listener;  // before the engine: it must outlive it (Shutdown still reports)
  auto engine = MakeEngine({.max_batch_size = 2}, /*warm=*/false);
  ASSERT_NE(engine, nullptr);
  engine->SetListener(&listener);
  ASSERT_TRUE(engine->Warmup().ok());
  const ModelInfo info = engine->ListModels().at(0);
  ASSERT_EQ(info.batching.size(), 1u);
  EXPECT_EQ(info.batching[0].max_batch_size, 2);
  EXPECT_THAT(info.batching[0].measured, IsEmpty());
  EXPECT_EQ(listener.chosen().at(absl::StrCat(info.name, "@cpu")), 2);
}

// Records the device events the engine reports.
class DeviceListener : public EngineListener {
 public:
  void OnDeviceStats(const DeviceStats& stats) override {
    absl::MutexLock lock(&mu_);
    devices_.insert(std::string(stats.device));
    busy_ += stats.busy;
    memory_known_ = memory_known_ || stats.memory_used_bytes >= 0 || stats.memory_total_bytes >= 0;
  }
  void OnBatchDone(const BatchStats& stats) override {
    absl::MutexLock lock(&mu_);
    batch_devices_.insert(std::string(stats.device));
  }
  std::set<std::string> devices() {
    absl::MutexLock lock(&mu_);
    return devices_;
  }
  std::set<std::string> batch_devices() {
    absl::MutexLock lock(&mu_);
    return batch_devices_;
  }
  absl::Duration busy() {
    absl::MutexLock lock(&mu_);
    return busy_;
  }
  bool memory_known() {
    absl::MutexLock lock(&mu_);
    return memory_known_;
  }

 private:
  absl::Mutex mu_;
  std::set<std::string> devices_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> batch_devices_ ABSL_GUARDED_BY(mu_);
  absl::Duration busy_ ABSL_GUARDED_BY(mu_);
  bool memory_known_ ABSL_GUARDED_BY(mu_) = false;
};

TEST(EngineTest, ReportsTheCpuBusyTimeAndNoMemory) {
  DeviceListener listener;  // before the engine: it must outlive it (Shutdown still reports)
  auto engine = MakeEngine({.instances_per_device = 2});
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->Devices(), (std::vector<std::string>{"cpu"}));
  engine->SetListener(&listener);
  const absl::Time start = absl::Now();
  std::vector<std::unique_ptr<Outcome>> outs;
  for (int i = 0; i < 8; ++i) {
    outs.push_back(std::make_unique<Outcome>());
    ASSERT_TRUE(engine->Submit(Params("a scarf", 4, i), outs.back()->Callbacks()).ok());
  }
  for (auto& o : outs) {
    o->done.WaitForNotification();
    EXPECT_TRUE(o->status.ok()) << o->status;
  }
  const absl::Duration elapsed = absl::Now() - start;
  EXPECT_EQ(listener.devices(), (std::set<std::string>{"cpu"}));
  EXPECT_EQ(listener.batch_devices(), (std::set<std::string>{"cpu"}));
  EXPECT_FALSE(listener.memory_known());
  // The union of the two workers' batch times: some, and never more than the wall time.
  EXPECT_GT(listener.busy(), absl::ZeroDuration());
  EXPECT_LE(listener.busy(), elapsed);
}

TEST(EngineTest, RejectsBadDevicePrecisionAndPostprocessOptions) {
  auto s = Engine::Create({.model_dirs = {kTinyBundle}, .devices = {"gpu"}}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("\"gpu\" is not a device"));
  s = Engine::Create({.model_dirs = {kTinyBundle}, .devices = {}}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  if (CudaDeviceCount() == 0) {
    s = Engine::Create({.model_dirs = {kTinyBundle}, .devices = {"all"}}).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  }
  Engine::Options o{.model_dirs = {kTinyBundle}};
  o.dtype = "half";
  s = Engine::Create(o).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("dtype override \"half\""));
  o.dtype = "";
  o.postprocess = "kernel";
  s = Engine::Create(o).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("postprocess"));
}

TEST(EngineTest, DTypeOverrideChangesHowTheModelRuns) {
  Engine::Options o;
  o.dtype = "bfloat16";
  auto bf16 = MakeEngine(o);
  auto fp32 = MakeEngine({});
  ASSERT_NE(bf16, nullptr);
  ASSERT_NE(fp32, nullptr);
  Outcome a, b;
  ASSERT_TRUE(bf16->Submit(Params("a sneaker", 1, 3), a.Callbacks()).ok());
  ASSERT_TRUE(fp32->Submit(Params("a sneaker", 1, 3), b.Callbacks()).ok());
  a.done.WaitForNotification();
  b.done.WaitForNotification();
  ASSERT_TRUE(a.status.ok() && b.status.ok());
  EXPECT_NE(Pixels(a.result.images.at(0)), Pixels(b.result.images.at(0)));
}

TEST(EngineTest, AV2BundleGetsBothTokenizationsOfThePrompt) {
  // SDXL's second tokenizer pads with "!" and splits "!!" into two pad ids: the engine must
  // hand the pipeline exactly what the two tokenizers give.
  const std::string bundle = testing::BuiltBundle("--sdxl --steps 2 --step-mode renoise");
  auto engine = MakeEngine({.model_dirs = {bundle}, .max_batch_size = 1});
  ASSERT_NE(engine, nullptr);
  GenerateParams p = Params("a cat!!", 1, 3);
  p.encoding = ImageEncoding::kRaw;
  Outcome served;
  ASSERT_TRUE(engine->Submit(p, served.Callbacks()).ok());
  served.done.WaitForNotification();
  ASSERT_TRUE(served.status.ok()) << served.status;

  absl::StatusOr<ModelManifest> manifest = ModelManifest::Load(bundle);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  ASSERT_TRUE(manifest->tokenizer_2.has_value());
  auto tokenize = [](const ModelManifest::Tokenizer& t) {
    auto tokenizer = ClipTokenizer::Create({.vocab_path = t.vocab_path,
                                            .merges_path = t.merges_path,
                                            .bos_token = t.bos_token,
                                            .eos_token = t.eos_token,
                                            .pad_token = t.pad_token});
    EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
    auto input = (*tokenizer)->EncodeForModel("a cat!!", t.max_length);
    EXPECT_TRUE(input.ok()) << input.status();
    return input->input_ids;
  };
  const std::vector<int32_t> ids = tokenize(manifest->tokenizer);
  const std::vector<int32_t> ids_2 = tokenize(*manifest->tokenizer_2);
  ASSERT_NE(ids, ids_2);  // "!!" is one token (748) for the first, two pad ids for the second
  auto pipeline = Pipeline::Create(*manifest, {});
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  auto direct = (*pipeline)->Run({{ids, 3, ids_2}}, manifest->width, manifest->height);
  ASSERT_TRUE(direct.ok()) << direct.status();
  EXPECT_EQ(served.result.images.at(0).data, direct->images.at(0));
  auto same_ids = (*pipeline)->Run({{ids, 3, ids}}, manifest->width, manifest->height);
  ASSERT_TRUE(same_ids.ok()) << same_ids.status();
  EXPECT_NE(served.result.images.at(0).data, same_ids->images.at(0));
}

TEST(EngineTest, ShutdownAfterTheGraceCancelsWhatIsQueuedAndLosesNothing) {
  auto engine = MakeEngine({.max_batch_size = 1, .max_queued_images = 1000});
  ASSERT_NE(engine, nullptr);
  constexpr int kRequests = 60;
  std::vector<Outcome> outcomes(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(engine->Submit(Params("a shoe", 8, i), outcomes[i].Callbacks()).ok());
  }
  engine->Shutdown(absl::ZeroDuration());  // 480 images queued: most never run
  int ok = 0, cancelled = 0;
  for (Outcome& outcome : outcomes) {
    ASSERT_TRUE(outcome.done.HasBeenNotified()) << "Shutdown returned before every on_done";
    if (outcome.status.ok()) {
      ++ok;
      EXPECT_EQ(outcome.result.images.size(), 8u);
    } else {
      ++cancelled;
      EXPECT_EQ(outcome.status.code(), absl::StatusCode::kCancelled) << outcome.status;
      EXPECT_THAT(outcome.status.message(), HasSubstr("drain grace of 0 ended"));
    }
  }
  EXPECT_EQ(ok + cancelled, kRequests);
  EXPECT_GT(cancelled, 0);
  Outcome late;
  EXPECT_EQ(engine->Submit(Params("a shoe", 1, 1), late.Callbacks()).code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace dmdserve
