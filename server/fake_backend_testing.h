// Test-only fakes of the generation backend (generation_backend.h) for the API servers' tests
// (image_service_test.cc, http_server_test.cc): MockBackend, whose Submit a test scripts, and
// ThreadedProducer, which serves an accepted request the way the engine does, from threads of
// its own, per a Script.
//
// Thread safety: ThreadedProducer's methods may be called from any thread; the callbacks it calls
// follow GenerationBackend's contract (serialised per request, on_done last and once).
#ifndef DMDSERVE_SERVER_FAKE_BACKEND_TESTING_H_
#define DMDSERVE_SERVER_FAKE_BACKEND_TESTING_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "server/generation_backend.h"

namespace dmdserve {

// Bound on every wait, so that a broken service fails a test instead of hanging it.
inline constexpr absl::Duration kWait = absl::Seconds(10);
// The seed of a fake request's image 0 (image i has kSeed + i).
inline constexpr uint64_t kSeed = 1000;

// How the fake backend serves one accepted request.
struct Script {
  // Image indexes in the order they are produced, each on its own thread.
  std::vector<int> order = {0};
  // on_done's status once every image is produced (CANCELLED instead when the fake honoured a
  // cancellation).
  absl::Status final_status;
  // After this many images of the request, wait (up to kWait) until the RPC is cancelled; -1:
  // never.
  int wait_for_cancel_after = -1;
  // Whether a seen cancellation stops production (as the engine does) or is ignored (a backend
  // that keeps producing after the client has gone).
  bool honour_cancel = true;
  // When set, on_done waits (up to kWait) until this is notified.
  absl::Notification* hold_done = nullptr;
  // When set, production pauses after `pause_after` images of the request until this is
  // notified (up to kWait): the test acts between two images.
  absl::Notification* resume = nullptr;
  int pause_after = -1;
};

// Serves requests the way the engine does, from other threads: each image of a request on a thread
// of its own, the threads taking turns in Script::order under one per-request lock, which is held
// around every callback (so calls are serialised), and the last thread calling on_done.
class ThreadedProducer {
 public:
  ~ThreadedProducer() { JoinAll(); }

  // Starts serving `params` per `script` and returns at once, as Submit does.
  absl::Status Start(GenerateParams params, GenerateCallbacks callbacks, const Script& script) {
    auto run = std::make_shared<Run>();
    run->params = std::move(params);
    run->callbacks = std::move(callbacks);
    run->script = script;
    run->result.model = run->params.model;
    std::lock_guard<std::mutex> lock(mu_);
    params_.push_back(run->params);
    for (int turn = 0; turn < static_cast<int>(script.order.size()); ++turn) {
      threads_.emplace_back([this, run, turn] { Produce(*run, turn); });
    }
    return absl::OkStatus();
  }

  void JoinAll() {
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      threads.swap(threads_);
    }
    for (std::thread& t : threads) t.join();
  }

  // The params of every request started so far.
  std::vector<GenerateParams> params() const {
    std::lock_guard<std::mutex> lock(mu_);
    return params_;
  }
  int images_produced() const { return images_produced_.load(); }
  bool saw_cancel() const { return saw_cancel_.load(); }
  int done_calls() const { return done_calls_.load(); }

 private:
  struct Run {
    GenerateParams params;
    GenerateCallbacks callbacks;
    Script script;
    std::mutex mu;  // the request's lock
    std::condition_variable turn_changed;
    int turn = 0;
    bool stopped = false;  // a cancellation was honoured
    int produced = 0;      // images of this request so far
    GenerateResult result;
  };

  static GeneratedImage MakeImage(const GenerateParams& params, int index) {
    GeneratedImage image;
    image.index = index;
    image.seed = kSeed + index;
    image.width = params.width;
    image.height = params.height;
    image.channels = 3;
    image.encoding = params.encoding;
    image.data = absl::StrCat("image-", index);
    return image;
  }

  // Polls is_cancelled (with the request's lock held, as the engine does) until it is true or
  // kWait passes.
  bool WaitForCancel(Run& run) {
    const absl::Time give_up = absl::Now() + kWait;
    while (absl::Now() < give_up) {
      if (run.callbacks.is_cancelled && run.callbacks.is_cancelled()) {
        saw_cancel_ = true;
        return true;
      }
      absl::SleepFor(absl::Milliseconds(1));
    }
    return false;
  }

  void ProduceImage(Run& run, int index) {
    const GenerateCallbacks& cb = run.callbacks;
    if (run.stopped) return;
    if (run.script.honour_cancel && cb.is_cancelled && cb.is_cancelled()) {
      saw_cancel_ = true;
      run.stopped = true;
      return;
    }
    run.result.timings.queue = absl::Milliseconds(250);
    run.result.truncated_tokens = 3;
    GeneratedImage image = MakeImage(run.params, index);
    if (cb.on_image) {
      cb.on_image(std::move(image), run.result);
    } else {
      run.result.images.push_back(std::move(image));
    }
    ++images_produced_;
    const int produced = ++run.produced;
    if (produced == run.script.pause_after && run.script.resume != nullptr) {
      run.script.resume->WaitForNotificationWithTimeout(kWait);
    }
    if (produced == run.script.wait_for_cancel_after && WaitForCancel(run) &&
        run.script.honour_cancel) {
      run.stopped = true;
    }
  }

  void Finish(Run& run) {
    if (run.script.hold_done != nullptr) {
      run.script.hold_done->WaitForNotificationWithTimeout(kWait);
    }
    std::sort(run.result.images.begin(), run.result.images.end(),
              [](const GeneratedImage& a, const GeneratedImage& b) { return a.index < b.index; });
    RequestTimings& t = run.result.timings;
    t.text_encoder = absl::Milliseconds(10);
    t.generator = absl::Milliseconds(20);
    t.decoder = absl::Milliseconds(30);
    t.encode = absl::Milliseconds(40);
    t.total = absl::Milliseconds(500);
    t.batch_size = static_cast<int>(run.script.order.size());
    absl::Status status =
        run.stopped ? absl::CancelledError("cancelled in the queue") : run.script.final_status;
    ++done_calls_;
    run.callbacks.on_done(std::move(status), std::move(run.result));
  }

  void Produce(Run& run, int turn) {
    std::unique_lock<std::mutex> lock(run.mu);
    run.turn_changed.wait(lock, [&] { return run.turn == turn; });
    ProduceImage(run, run.script.order[turn]);
    ++run.turn;
    run.turn_changed.notify_all();
    if (run.turn == static_cast<int>(run.script.order.size())) Finish(run);
  }

  mutable std::mutex mu_;
  std::vector<std::thread> threads_;
  std::vector<GenerateParams> params_;
  std::atomic<int> images_produced_{0};
  std::atomic<bool> saw_cancel_{false};
  std::atomic<int> done_calls_{0};
};

class MockBackend : public GenerationBackend {
 public:
  MOCK_METHOD(absl::StatusOr<std::string>, ResolveModel, (std::string_view), (const, override));
  MOCK_METHOD(absl::Status, Submit, (GenerateParams, GenerateCallbacks), (override));
  MOCK_METHOD(absl::StatusOr<TokenizeResult>, Tokenize, (std::string_view, std::string_view),
              (const, override));
  MOCK_METHOD(std::vector<ModelInfo>, ListModels, (), (const, override));
};

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_FAKE_BACKEND_TESTING_H_
