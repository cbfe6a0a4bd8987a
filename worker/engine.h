// Engine: the public API of worker/ -- everything the server needs to serve image generation.
//
// The engine owns, per model bundle: its manifest, ClipTokenizer, one DynamicBatcher (batching
// key = index of the output size) and, per device of Options.devices (a worker group), a Pipeline
// on that device with `instances_per_device` model-worker threads that pull formed batches from
// the model's one batcher and run them, each on its own execution instance of that pipeline (on a
// GPU: its own CUDA stream and CUDA graphs); plus one PNG-encode ThreadPool shared by all models,
// so encoding never runs on a model worker. A request's images are queued as independent work items
// (the batching unit is one image) and may ride in different batches, on different devices.
//
// Flow: Submit() validates the model-dependent parts of a request (model, num_images, size, prompt
// encoding), tokenizes the prompt, and enqueues its images; it fails fast with a status (NOT_FOUND,
// INVALID_ARGUMENT, RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when not ready or
// shutting down) and then calls no callback. When it returns OK, callbacks.on_done is called
// exactly once, later, on an engine thread, with the result or the first error (DEADLINE_EXCEEDED
// or CANCELLED when dropped in the queue, RESOURCE_EXHAUSTED when the device ran out of memory on
// its batch, INTERNAL when the model failed on its batch). Either failure fails only that batch's
// requests; the workers keep serving.
//
// Seeds: image i of a request uses seed `seed + i` (mod 2^64); an absent seed is drawn at random
// and reported with every image. Noise contract: see docs/ARCHITECTURE.md.
//
// Thread safety: all public methods are thread-safe. Callbacks run on engine threads and must not
// block. No exception leaves the engine. gRPC/protobuf/Prometheus are unknown here: metrics flow
// out through the EngineListener interface.
#ifndef DMDSERVE_WORKER_ENGINE_H_
#define DMDSERVE_WORKER_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/batch_size_tuner.h"
#include "worker/clock.h"

namespace dmdserve {

enum class ImageEncoding { kPng, kRaw };

// A generation request in native types (the server converts the wire format into this).
struct GenerateParams {
  std::string model;             // empty: the default model
  std::string prompt;            // UTF-8
  int num_images = 1;            // 1..the model's max_images_per_request
  std::optional<uint64_t> seed;  // seed of image 0; absent: drawn at random
  int width = 0;                 // pixels; 0 (with height 0): the model's default size
  int height = 0;
  ImageEncoding encoding = ImageEncoding::kPng;
  std::string request_id;                        // for logs only
  absl::Time deadline = absl::InfiniteFuture();  // dropped unrun once this passes in the queue
};

// Where a request's time went.
struct RequestTimings {
  absl::Duration queue;         // accepted -> its first image entered a batch
  absl::Duration text_encoder;  // stage times of the last batch the request rode in
  absl::Duration generator;
  absl::Duration decoder;
  absl::Duration encode;  // sum of its images' encode times
  absl::Duration total;   // accepted -> last image ready
  int batch_size = 0;     // largest batch (images, padding excluded) it rode in
};

struct GeneratedImage {
  int index = 0;
  uint64_t seed = 0;
  int width = 0;
  int height = 0;
  int channels = 0;
  ImageEncoding encoding = ImageEncoding::kPng;
  std::string data;  // PNG file, or raw uint8 HWC pixels
  absl::Duration encode_time;
};

struct GenerateResult {
  std::string model;                   // resolved model name
  std::vector<GeneratedImage> images;  // index order; empty when images were streamed
  RequestTimings timings;
  int truncated_tokens = 0;  // prompt tokens cut by the model's token limit
};

struct GenerateCallbacks {
  // Optional. When set, each image is handed over as soon as it is encoded (any index order) and
  // GenerateResult::images stays empty. `so_far` holds the request-level fields (model, timings up
  // to this image, truncated_tokens) and no images. Called with the request's lock held, so calls
  // are serialised and all precede on_done: must not block.
  std::function<void(GeneratedImage image, const GenerateResult& so_far)> on_image;
  // Required. Called exactly once when the request completes or fails.
  std::function<void(absl::Status status, GenerateResult result)> on_done;
  // Optional. Polled before the request's images enter a batch; true drops them (CANCELLED).
  // Called with the request's lock held and never after on_done, so it may refer to state that
  // lives until on_done; must not block.
  std::function<bool()> is_cancelled;
};

struct ImageSize {
  int width = 0;
  int height = 0;
};

// How big the batches of a model are on one device, and why.
struct DeviceBatching {
  std::string device;      // "cpu", "cuda:N"
  int max_batch_size = 0;  // largest batch the device's workers take
  // The warm-up measurement the choice came from (batch_size_tuner.h); empty when the size was
  // configured (Options.max_batch_size) rather than measured.
  std::vector<BatchCost> measured;
};

struct ModelInfo {
  std::string name;
  std::string description;
  int width = 0;
  int height = 0;
  int channels = 0;
  int steps = 0;
  bool is_default = false;
  int max_images_per_request = 0;
  bool ready = false;
  std::vector<ImageSize> supported_sizes;  // default first
  int max_tokens = 0;
  std::vector<DeviceBatching> batching;  // one per device, in Devices() order; empty until ready
};

struct TokenizeResult {
  std::string model;
  std::vector<int32_t> ids;
  std::vector<std::string> tokens;
  std::vector<int32_t> input_ids;
  int truncated_tokens = 0;
};

// What one batch did, for metrics.
struct BatchStats {
  std::string_view model;
  int images = 0;       // real images in the batch
  int padded_size = 0;  // what the model ran (>= images)
  // Stage times; zero for a CUDA-graph replay, which runs every stage at once.
  absl::Duration text_encoder;
  absl::Duration generator;
  absl::Duration decoder;
  bool ok = true;
  std::string_view device;  // "cpu", "cuda:N"
  absl::Duration total;     // the whole Pipeline::Run (ok batches)
  bool cuda_graph = false;  // a CUDA graph was replayed
};

// How busy one device is and, for a GPU, its memory. Reported after every batch that ran on it.
struct DeviceStats {
  std::string_view device;  // "cpu", "cuda:N"
  // Time during which at least one batch ran on the device (the union over its workers, not the
  // sum), since the previous report for the device. Summed over reports and divided by wall time,
  // it is the device's busy ratio.
  absl::Duration busy;
  // Device-wide memory in use (all processes) and in total; -1 when not known (the CPU).
  int64_t memory_used_bytes = -1;
  int64_t memory_total_bytes = -1;
};

// Receives engine events (the server turns them into Prometheus metrics). Methods are called on
// engine threads, concurrently; they must be thread-safe and must not block. Default: ignore.
class EngineListener {
 public:
  virtual ~EngineListener() = default;
  virtual void OnBatchDone(const BatchStats& stats) {}
  virtual void OnImageEncoded(std::string_view model, absl::Duration encode_time) {}
  virtual void OnQueueDepth(std::string_view model, int queued_images) {}
  virtual void OnModelReady(std::string_view model, bool ready) {}
  virtual void OnDeviceStats(const DeviceStats& stats) {}
  // At warm-up: the largest batch `model`'s workers on `device` will take.
  virtual void OnBatchSizeChosen(std::string_view model, std::string_view device,
                                 int max_batch_size) {}
};

class Engine {
 public:
  struct Options {
    // Model bundle directories (each holds a model.json). At least one.
    std::vector<std::string> model_dirs;
    // Name of the model used when a request names none; empty: the first bundle's model.
    std::string default_model;
    // libtorch devices, one worker group each: "cpu", "cuda:N" (CUDA builds), "N" for "cuda:N",
    // or {"all"}: every visible GPU (see ResolveDevices in worker/device.h). Default {"cpu"}.
    std::vector<std::string> devices = {"cpu"};
    // Execution instances per model and device: that many model-worker threads, each running one
    // batch at a time on its own instance of the device's Pipeline (Pipeline::Options::instances;
    // a CUDA stream and its CUDA graphs on a GPU). >= 0. 0 (default): derived from the CPUs the
    // process may use (affinity mask and cgroup quota, worker/cpu_budget.h) when the devices
    // include the CPU (2 CPUs: 2, 8: 4, 64: 4), else 1.
    int instances_per_device = 0;
    // libtorch intra-op threads (process-wide). >= 0. 0 (default): derived from the CPU budget:
    // CPUs / CPU model workers (2 CPUs: 1, 64: 16; PlanCpuThreads in worker/cpu_budget.h), or
    // every usable CPU when no CPU device is served.
    int intra_op_threads = 0;
    // Keep freed activations in the process: glibc malloc's default thresholds (process-wide,
    // worker/malloc_tuning.h). Off: glibc's defaults, which return them to the kernel after
    // every batch. Default on.
    bool tune_malloc = true;
    // TorchScript graph-executor optimisation (process-wide); libtorch's default is on. The
    // profiling executor specialises graphs to the batch shapes it sees first; on some graphs
    // varying batch sizes then run a slower fallback, and turning this off helps
    // (docs/PERFORMANCE.md: measure with pipeline_benchmark --jit_optimize=false).
    bool jit_optimize = true;
    // Largest batch in images, capped at the model's largest supported batch size. 0 (default):
    // chosen per model and device at warm-up by timing the model's batch sizes with the device's
    // workers running at once, where the per-image time stops falling (worker/batch_size_tuner.h);
    // ListModels() reports the choice and its measurement.
    int max_batch_size = 0;
    // How long each candidate batch size is timed when max_batch_size is 0 (at least one batch
    // per worker). Default 250 ms.
    absl::Duration batch_tuning_time = absl::Milliseconds(250);
    // A partial batch closes when its oldest image has waited this long. Default 0: a free worker
    // takes whatever is queued, and batches still fill from the images that queue while workers
    // are busy. A delay makes a free worker idle until the batch fills; it pays off only when a
    // fuller batch is much cheaper per image (see docs/PERFORMANCE.md).
    absl::Duration max_queue_delay = absl::ZeroDuration();
    // Images queued per model before requests are rejected with RESOURCE_EXHAUSTED. Default 256.
    // Also caps images per request, so that every accepted size can fit an empty queue.
    int max_queued_images = 256;
    // Optional batch sizes to pad batches up to (ascending); empty: no padding.
    std::vector<int> allowed_batch_sizes;
    // Largest num_images per request; 0: each model's own limit. Capped at the latter.
    int max_images_per_request = 0;
    // Warm-up passes over every batch size before a model reports ready. TorchScript's profiling
    // executor optimises a graph only after it has run a couple of times. >= 1. Default 2.
    int warmup_runs = 2;
    // PNG encoder threads (shared by all models). >= 1. Default 2.
    int encode_threads = 2;
    // zlib level 0..9 for PNG. Default 1 (fast; images are small).
    int png_compression_level = 1;
    // Time source; not owned; nullptr: the real clock.
    Clock* clock = nullptr;
    // GPUs: capture a CUDA graph per model, worker, supported size and manifest batch size at
    // warm-up, and pad batches up to the next manifest batch size to replay them (shapes whose
    // capture fails run eagerly, logged). Ignored on the CPU. Default on.
    bool cuda_graphs = true;
    // Overrides every model's manifest dtypes: "" (none), a dtype for every component
    // ("bfloat16"), or component=dtype pairs ("generator=float16,decoder=float32"); see
    // ApplyDTypeOverride in worker/model_manifest.h. The sampling arithmetic stays float32.
    std::string dtype;
    // Decoded image -> uint8 conversion: "torch" (libtorch ops, any device) or "cuda_kernel"
    // (dmdserve's kernel; CUDA builds on GPUs). Default "torch".
    std::string postprocess = "torch";
    // CPU devices: store each decoder's convolution weights channels-last (NHWC) at load, so
    // that oneDNN runs them without layout reorders (Pipeline::Options.channels_last_decoder;
    // the same images up to float rounding). Ignored on CUDA devices. Default on.
    bool channels_last_decoder = true;
  };

  // Settles the thread counts (logging the CPU budget they come from) and loads every bundle
  // (manifest, tokenizer, TorchScript modules). Models are not ready, and no model worker runs,
  // until Warmup(). Errors name the bundle and the field or file at fault.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(Options options);

  // Shuts down (see Shutdown) and joins every thread.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Sets the sink for engine events (metrics). Not owned; must outlive the engine. Call before
  // Warmup(); the model names it needs are known from ListModels() after Create().
  void SetListener(EngineListener* listener);

  // Runs every model once per batch size it will see, measures its batch sizes (max_batch_size
  // 0), starts its model workers and marks it ready. Call once, before serving; an error is a
  // startup error.
  absl::Status Warmup();

  // See the class comment. `callbacks.on_done` must be set.
  absl::Status Submit(GenerateParams params, GenerateCallbacks callbacks);

  // Tokenizes `text` with `model`'s tokenizer (empty: the default model) exactly as Submit does.
  absl::StatusOr<TokenizeResult> Tokenize(std::string_view model, std::string_view text) const;

  std::vector<ModelInfo> ListModels() const;

  // The devices the engine runs on, one worker group each ("cpu", "cuda:N"), in Options order.
  std::vector<std::string> Devices() const;

  // The name of the model `name` refers to (empty: the default model); NOT_FOUND naming the
  // served models otherwise.
  absl::StatusOr<std::string> ResolveModel(std::string_view name) const;

  // True once every model is warmed up and until Shutdown() starts.
  bool ready() const;

  // Stops accepting (Submit returns UNAVAILABLE) and drains: accepted requests run until the
  // queues are empty or `grace` has passed; then every request still queued finishes with
  // CANCELLED (the message names the grace), batches already running finish with their results,
  // and the threads are joined. Every accepted request's on_done runs before this returns.
  // Idempotent (a later call returns at once).
  void Shutdown(absl::Duration grace = absl::InfiniteDuration());

 private:
  struct Model;
  struct Replica;
  struct DeviceState;
  struct Request;
  struct WorkItem;

  explicit Engine(Options options);
  absl::StatusOr<Model*> FindModel(std::string_view name) const;
  // Warmup's steps for one model: its warm-up passes and CUDA graphs, the batch-size choice per
  // device, then Options.instances_per_device WorkerLoop threads per device (unless shut down).
  absl::Status WarmupModel(Model& model);
  absl::Status ChooseBatchSizes(Model& model);
  void StartWorkers(Model& model);
  // A model-worker thread: runs the model's batches (up to the replica's chosen size) on
  // `replica` until the batcher shuts down.
  void WorkerLoop(Model* model, Replica* replica);
  // Runs one batch of `items` at supported size `size_index` (padded to `padded_size` images) on
  // `replica`, then schedules EncodeImage for each image on the encoder pool. A failed batch
  // fails its requests.
  void RunBatch(Model* model, Replica* replica, int size_index, std::vector<WorkItem> items,
                int padded_size);
  // The encode stage, on an encoder thread: turns `item`'s uint8 HWC `pixels` into a PNG (or
  // keeps them raw, as the request asked) and hands the image to FinishImage.
  void EncodeImage(const Model& model, ImageSize size, WorkItem item, std::string pixels);
  // Delivers one finished image to its request (on_image or the result) and, for its last image,
  // completes the request (on_done). Dropped when the request already finished.
  void FinishImage(const std::shared_ptr<Request>& request, GeneratedImage image);
  // Completes `request` with `status` unless it already finished.
  static void FailRequest(const std::shared_ptr<Request>& request, absl::Status status);

  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_ENGINE_H_
