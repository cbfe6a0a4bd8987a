// Engine internals shared by engine.cc (serving) and engine_startup.cc (loading and warm-up):
// the private structs of Engine and two helpers. Not part of worker/'s API: include only from
// those two files.
#ifndef DMDSERVE_WORKER_ENGINE_INTERNAL_H_
#define DMDSERVE_WORKER_ENGINE_INTERNAL_H_

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "worker/batcher.h"
#include "worker/clip_tokenizer.h"
#include "worker/device.h"
#include "worker/engine.h"
#include "worker/model_manifest.h"
#include "worker/pipeline.h"
#include "worker/thread_pool.h"

namespace dmdserve {

// One accepted request. Shared by its work items; finished exactly once.
struct Engine::Request {
  GenerateParams params;
  GenerateCallbacks callbacks;
  uint64_t seed = 0;
  std::string model;
  std::vector<int32_t> input_ids;
  std::vector<int32_t> input_ids_2;  // the second tokenizer's, for a model with tokenizer_2
  int truncated_tokens = 0;          // the larger count of the two tokenizers
  absl::Time accepted;
  Clock* clock = nullptr;

  absl::Mutex mu;
  bool finished ABSL_GUARDED_BY(mu) = false;
  int remaining ABSL_GUARDED_BY(mu) = 0;
  bool started ABSL_GUARDED_BY(mu) = false;  // first image entered a batch
  std::vector<GeneratedImage> images ABSL_GUARDED_BY(mu);
  RequestTimings timings ABSL_GUARDED_BY(mu);

  // Its result without images: the request-level fields, `total` timed up to now.
  GenerateResult ResultSoFar() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    GenerateResult result;
    result.model = model;
    result.timings = timings;
    result.timings.total = clock->Now() - accepted;
    result.truncated_tokens = truncated_tokens;
    return result;
  }
  // The batcher's validator: OK while the request's images may still enter a batch at `now`;
  // else why not (it finished, its deadline passed, or the client cancelled).
  absl::Status CheckRunnable(absl::Time now) {
    // Held across is_cancelled(): whatever it refers to (the RPC's context) lives until on_done,
    // which runs only after `finished` is set under this lock.
    absl::MutexLock lock(&mu);
    if (finished) return absl::CancelledError("request already finished");
    if (now >= params.deadline) {
      return absl::DeadlineExceededError(
          "the request's deadline passed while it waited in the queue");
    }
    if (callbacks.is_cancelled && callbacks.is_cancelled()) {
      return absl::CancelledError("the client cancelled the request");
    }
    return absl::OkStatus();
  }
  // One of its images entered a batch of `batch_size` images at `now`.
  void EnterBatch(absl::Time now, int batch_size) {
    absl::MutexLock lock(&mu);
    if (!started) {
      started = true;
      timings.queue = now - accepted;
    }
    timings.batch_size = std::max(timings.batch_size, batch_size);
  }
  // The stage times of the latest batch one of its images rode in.
  void SetStageTimes(const Pipeline::Timings& stages) {
    absl::MutexLock lock(&mu);
    timings.text_encoder = stages.text_encoder;
    timings.generator = stages.generator;
    timings.decoder = stages.decoder;
  }
};

// One image of a request: the batching unit.
struct Engine::WorkItem {
  std::shared_ptr<Request> request;
  int index = 0;

  // This image's seed: the request's seed + its index (mod 2^64), the noise contract.
  uint64_t seed() const { return request->seed + index; }
  // What the pipeline needs to make this image.
  Pipeline::Input input() const { return {request->input_ids, seed(), request->input_ids_2}; }
};

// One device of Options.devices, shared by the worker groups of every model on it.
struct Engine::DeviceState {
  std::string name;  // "cpu", "cuda:N"
  bool cuda = false;
  DeviceBusyTime busy;
};

// A model's worker group on one device: its pipeline there (one execution instance per worker)
// and the worker threads.
struct Engine::Replica {
  std::unique_ptr<Pipeline> pipeline;
  DeviceState* device = nullptr;
  std::vector<std::thread> workers;
  // The largest batch its workers take (set by warm-up before they start).
  DeviceBatching batching;
};

struct Engine::Model {
  ModelManifest manifest;
  std::unique_ptr<ClipTokenizer> tokenizer;
  std::unique_ptr<ClipTokenizer> tokenizer_2;  // set when the manifest has tokenizer_2
  std::vector<std::unique_ptr<Replica>> replicas;     // one per device, in Options order
  std::unique_ptr<DynamicBatcher<WorkItem>> batcher;  // key: index into info.supported_sizes
  ModelInfo info;  // static part; `ready` lives in the atomic below, `batching` in the vector
  std::vector<DeviceBatching> batching;  // per replica; written by warm-up before `ready`
  std::atomic<bool> ready{false};
};

struct Engine::State {
  Options options;
  Clock* clock = nullptr;
  std::vector<std::unique_ptr<DeviceState>> devices;  // Options.devices, resolved
  std::vector<std::unique_ptr<Model>> models;
  std::map<std::string, Model*, std::less<>> by_name;
  Model* default_model = nullptr;
  std::unique_ptr<ThreadPool> encoders;
  std::atomic<EngineListener*> listener{nullptr};
  std::atomic<bool> accepting{true};
  absl::Mutex shutdown_mu;
  bool shut_down ABSL_GUARDED_BY(shutdown_mu) = false;

  EngineListener* events() {
    static EngineListener* const kIgnore = new EngineListener();
    EngineListener* l = listener.load();
    return l != nullptr ? l : kIgnore;
  }

  // Create's steps: resolve Options.devices into `devices`; load the bundle in `dir` (errors name
  // it) into `models` and `by_name`, in LoadModel's steps: the manifest (Options.dtype applied;
  // its model name must be new), the tokenizers (returning the empty prompt's ids), a replica
  // per device and the batcher; set `default_model` (Options.default_model; empty: the first).
  absl::Status AddDevices();
  // Settles Options.instances_per_device and .intra_op_threads (0: from the CPU budget) and logs
  // them with the budget.
  void PlanThreads();
  absl::Status LoadModel(const std::string& dir, Pipeline::Postprocess postprocess);
  absl::Status LoadManifest(const std::string& dir, const std::string& where, Model& model) const;
  struct EmptyPrompt {
    std::vector<int32_t> input_ids;
    std::vector<int32_t> input_ids_2;  // empty without tokenizer_2
  };
  absl::StatusOr<EmptyPrompt> LoadTokenizers(Model& model) const;
  absl::Status AddReplicas(Model& model, const EmptyPrompt& empty_prompt,
                           Pipeline::Postprocess postprocess) const;
  absl::Status AddBatcher(Model& model);
  absl::Status ChooseDefaultModel();
  // Shutdown's wait: until every model's queue is empty or `grace` has passed; then cancels what
  // is still queued (the requests finish with CANCELLED).
  void DrainQueues(absl::Duration grace);

  // RunBatch's steps. Runs `items` (padded to `padded_size` by repeating the last image) on
  // `replica`'s device at `size`, then reports the batch's and the device's stats.
  absl::StatusOr<Pipeline::Output> RunOnDevice(const Model& model, Replica& replica,
                                               const std::vector<WorkItem>& items, int padded_size,
                                               ImageSize size);
  // Reports a batch that ran (or failed: !output.ok()) on `device`, which was busy for `busy`.
  void ReportBatch(const Model& model, const DeviceState& device, int images, int padded_size,
                   const absl::StatusOr<Pipeline::Output>& output, absl::Duration busy);
};

namespace engine_internal {

// `s` with `context: ` before its message, same code.
absl::Status WithContext(const absl::Status& s, absl::string_view context);

// The largest batch the engine forms for model `m` (Options.max_batch_size capped at the
// model's largest; the model's largest when 0).
int MaxBatchSize(const ModelManifest& m, const Engine::Options& o);

}  // namespace engine_internal
}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_ENGINE_INTERNAL_H_
