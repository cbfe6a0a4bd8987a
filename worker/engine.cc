#include "worker/engine.h"

#include <torch/csrc/jit/runtime/graph_executor.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <thread>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "spdlog/spdlog.h"
#include "worker/batcher.h"
#include "worker/clip_tokenizer.h"
#include "worker/cpu_budget.h"
#include "worker/device.h"
#include "worker/image_codec.h"
#include "worker/malloc_tuning.h"
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
  int truncated_tokens = 0;
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
  Pipeline::Input input() const { return {request->input_ids, seed()}; }
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
  // its model name must be new), the tokenizer (returning the empty prompt's input_ids), a replica
  // per device and the batcher; set `default_model` (Options.default_model; empty: the first).
  absl::Status AddDevices();
  // Settles Options.instances_per_device and .intra_op_threads (0: from the CPU budget) and logs
  // them with the budget.
  void PlanThreads();
  absl::Status LoadModel(const std::string& dir, Pipeline::Postprocess postprocess);
  absl::Status LoadManifest(const std::string& dir, const std::string& where, Model& model) const;
  absl::StatusOr<std::vector<int32_t>> LoadTokenizer(Model& model) const;
  absl::Status AddReplicas(Model& model, const std::vector<int32_t>& uncond_input_ids,
                           Pipeline::Postprocess postprocess) const;
  absl::Status AddBatcher(Model& model);
  absl::Status ChooseDefaultModel();

  // RunBatch's steps. Runs `items` (padded to `padded_size` by repeating the last image) on
  // `replica`'s device at `size`, then reports the batch's and the device's stats.
  absl::StatusOr<Pipeline::Output> RunOnDevice(const Model& model, Replica& replica,
                                               const std::vector<WorkItem>& items,
                                               int padded_size, ImageSize size);
  // Reports a batch that ran (or failed: !output.ok()) on `device`, which was busy for `busy`.
  void ReportBatch(const Model& model, const DeviceState& device, int images, int padded_size,
                   const absl::StatusOr<Pipeline::Output>& output, absl::Duration busy);
};

Engine::Engine(Options options) : state_(std::make_unique<State>()) {
  state_->options = std::move(options);
  state_->clock = state_->options.clock != nullptr ? state_->options.clock : RealClock::Get();
}

Engine::~Engine() { Shutdown(); }

namespace {

absl::Status ValidateOptions(const Engine::Options& o) {
  if (o.model_dirs.empty()) return absl::InvalidArgumentError("model_dirs: at least one bundle");
  if (o.devices.empty()) return absl::InvalidArgumentError("devices: at least one device");
  if (o.instances_per_device < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("instances_per_device must be >= 0, got ", o.instances_per_device));
  }
  if (o.intra_op_threads < 0) return absl::InvalidArgumentError("intra_op_threads must be >= 0");
  if (o.max_batch_size < 0) return absl::InvalidArgumentError("max_batch_size must be >= 0");
  if (o.batch_tuning_time < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("batch_tuning_time must be >= 0");
  }
  if (o.max_images_per_request < 0) {
    return absl::InvalidArgumentError("max_images_per_request must be >= 0");
  }
  if (o.encode_threads < 1) return absl::InvalidArgumentError("encode_threads must be >= 1");
  if (o.warmup_runs < 1) return absl::InvalidArgumentError("warmup_runs must be >= 1");
  if (o.png_compression_level < 0 || o.png_compression_level > 9) {
    return absl::InvalidArgumentError(
        absl::StrCat("png_compression_level must be in 0..9, got ", o.png_compression_level));
  }
  return absl::OkStatus();
}

absl::Status WithContext(const absl::Status& s, absl::string_view context) {
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

// The largest batch the engine forms for model `m`.
int MaxBatchSize(const ModelManifest& m, const Engine::Options& o) {
  const int model_max_batch = m.max_batch_size();
  return o.max_batch_size == 0 ? model_max_batch : std::min(o.max_batch_size, model_max_batch);
}

// The static part of model `m`'s ModelInfo under the limits of `o`.
ModelInfo MakeModelInfo(const ModelManifest& m, const Engine::Options& o) {
  ModelInfo info;
  info.name = m.name;
  info.description = m.description;
  info.width = m.width;
  info.height = m.height;
  info.channels = m.channels;
  info.steps = static_cast<int>(m.schedule.timesteps.size());
  info.max_images_per_request = o.max_images_per_request == 0
                                    ? m.max_images_per_request
                                    : std::min(o.max_images_per_request, m.max_images_per_request);
  if (info.max_images_per_request > o.max_queued_images) {
    // A request that can never fit the queue must be INVALID_ARGUMENT, not a retryable
    // RESOURCE_EXHAUSTED that clients would retry forever.
    spdlog::warn("model '{}': max images per request capped from {} to max_queued_images {}",
                 m.name, info.max_images_per_request, o.max_queued_images);
    info.max_images_per_request = o.max_queued_images;
  }
  info.max_tokens = m.tokenizer.max_length;
  for (const auto& size : m.supported_sizes) {
    info.supported_sizes.push_back({size.width, size.height});
  }
  return info;
}

// A batch of `batch_size` distinct prompts (so that the text encoder runs on all of them), for
// timing batch sizes.
std::vector<Pipeline::Input> TuningBatch(const ModelManifest& m, int batch_size) {
  std::vector<Pipeline::Input> batch(batch_size);
  for (int i = 0; i < batch_size; ++i) {
    batch[i].input_ids.assign(m.tokenizer.max_length, 0);
    batch[i].input_ids[0] = i;
    batch[i].seed = i;
  }
  return batch;
}

// What the requests of a batch that failed with `error` (from Pipeline::Run) are told.
absl::Status BatchFailure(const std::string& model, int images, const absl::Status& error) {
  if (error.code() == absl::StatusCode::kResourceExhausted) {
    return absl::ResourceExhaustedError(
        absl::StrCat("model '", model, "' ran out of device memory on a batch of ", images,
                     " image(s); retry later or ask for fewer images"));
  }
  return absl::InternalError(absl::StrCat("model '", model, "' failed to generate the image"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(Options options) {
  if (absl::Status s = ValidateOptions(options); !s.ok()) return s;
  std::unique_ptr<Engine> engine(new Engine(std::move(options)));
  State& st = *engine->state_;
  const Options& o = st.options;
  torch::jit::setGraphExecutorOptimize(o.jit_optimize);
  if (o.tune_malloc) {
    const MallocTuning tuning;
    if (absl::Status s = ApplyMallocTuning(tuning); !s.ok()) return s;
    spdlog::info("malloc: glibc mmap threshold {} MiB, trim threshold {} MiB",
                 tuning.mmap_threshold_bytes >> 20, tuning.trim_threshold_bytes >> 20);
  }
  if (absl::Status s = st.AddDevices(); !s.ok()) return s;
  st.PlanThreads();
  absl::StatusOr<Pipeline::Postprocess> postprocess = Pipeline::ParsePostprocess(o.postprocess);
  if (!postprocess.ok()) return postprocess.status();
  absl::StatusOr<std::unique_ptr<ThreadPool>> encoders =
      ThreadPool::Create({.num_threads = o.encode_threads});
  if (!encoders.ok()) return encoders.status();
  st.encoders = *std::move(encoders);
  for (const std::string& dir : o.model_dirs) {
    if (absl::Status s = st.LoadModel(dir, *postprocess); !s.ok()) return s;
  }
  if (absl::Status s = st.ChooseDefaultModel(); !s.ok()) return s;
  return engine;
}

absl::Status Engine::State::AddDevices() {
  absl::StatusOr<std::vector<std::string>> names = ResolveDevices(options.devices);
  if (!names.ok()) return names.status();
  for (const std::string& name : *names) {
    auto device = std::make_unique<DeviceState>();
    device->name = name;
    const absl::StatusOr<DeviceId> id = ParseDevice(name);
    device->cuda = id.ok() && id->cuda;
    devices.push_back(std::move(device));
  }
  return absl::OkStatus();
}

void Engine::State::PlanThreads() {
  const bool on_cpu = std::any_of(devices.begin(), devices.end(),
                                  [](const auto& device) { return !device->cuda; });
  const CpuBudget budget = ReadCpuBudget();
  CpuThreadPlan plan;
  if (on_cpu) {
    plan = PlanCpuThreads(budget.usable_cpus, options.instances_per_device,
                          options.intra_op_threads);
  } else {
    plan.instances = options.instances_per_device > 0 ? options.instances_per_device : 1;
    plan.intra_op_threads =
        options.intra_op_threads > 0 ? options.intra_op_threads : budget.usable_cpus;
  }
  const auto origin = [](int given) { return given > 0 ? "given" : "derived"; };
  spdlog::info("CPU budget: {}; {} model worker(s) per model and device ({}) x {} intra-op "
               "thread(s) ({})",
               budget.Describe(), plan.instances, origin(options.instances_per_device),
               plan.intra_op_threads, origin(options.intra_op_threads));
  options.instances_per_device = plan.instances;
  options.intra_op_threads = plan.intra_op_threads;
}

absl::Status Engine::State::LoadModel(const std::string& dir, Pipeline::Postprocess postprocess) {
  const std::string where = absl::StrCat("model bundle ", dir);
  auto model = std::make_unique<Model>();
  if (absl::Status s = LoadManifest(dir, where, *model); !s.ok()) return s;
  absl::StatusOr<std::vector<int32_t>> uncond_input_ids = LoadTokenizer(*model);
  if (!uncond_input_ids.ok()) return WithContext(uncond_input_ids.status(), where);
  if (absl::Status s = AddReplicas(*model, *uncond_input_ids, postprocess); !s.ok()) {
    return WithContext(s, where);
  }
  if (absl::Status s = AddBatcher(*model); !s.ok()) return WithContext(s, "batcher options");
  const ModelManifest& m = model->manifest;
  const ModelInfo& info = model->info = MakeModelInfo(m, options);
  const auto append_name = [](std::string* out, const auto& device) { out->append(device->name); };
  spdlog::info(
      "loaded model '{}' from {} ({}x{}x{}, {} step(s), max batch {}, dtypes {}/{}/{}) on {}",
      info.name, dir, info.width, info.height, info.channels, info.steps, MaxBatchSize(m, options),
      DTypeName(m.dtypes.text_encoder), DTypeName(m.dtypes.generator),
      DTypeName(m.dtypes.decoder), absl::StrJoin(devices, ", ", append_name));
  by_name.emplace(m.name, model.get());
  models.push_back(std::move(model));
  return absl::OkStatus();
}

absl::Status Engine::State::LoadManifest(const std::string& dir, const std::string& where,
                                         Model& model) const {
  absl::StatusOr<ModelManifest> manifest = ModelManifest::Load(dir);
  if (!manifest.ok()) return WithContext(manifest.status(), where);
  model.manifest = *std::move(manifest);
  if (absl::Status s = ApplyDTypeOverride(options.dtype, model.manifest.dtypes); !s.ok()) return s;
  if (by_name.count(model.manifest.name) > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": model name '", model.manifest.name, "' is already served by another bundle"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> Engine::State::LoadTokenizer(Model& model) const {
  const ModelManifest::Tokenizer& t = model.manifest.tokenizer;
  absl::StatusOr<std::unique_ptr<ClipTokenizer>> tokenizer =
      ClipTokenizer::Create({.vocab_path = t.vocab_path,
                             .merges_path = t.merges_path,
                             .bos_token = t.bos_token,
                             .eos_token = t.eos_token,
                             .pad_token = t.pad_token});
  if (!tokenizer.ok()) return tokenizer.status();
  model.tokenizer = *std::move(tokenizer);
  absl::StatusOr<ClipTokenizer::ModelInput> uncond =
      model.tokenizer->EncodeForModel("", t.max_length);
  if (!uncond.ok()) return uncond.status();
  return std::move(uncond->input_ids);
}

absl::Status Engine::State::AddReplicas(Model& model, const std::vector<int32_t>& uncond_input_ids,
                                        Pipeline::Postprocess postprocess) const {
  for (const std::unique_ptr<DeviceState>& device : devices) {
    absl::StatusOr<std::unique_ptr<Pipeline>> pipeline =
        Pipeline::Create(model.manifest, {.device = device->name,
                                          .intra_op_threads = options.intra_op_threads,
                                          .uncond_input_ids = uncond_input_ids,
                                          .instances = options.instances_per_device,
                                          .cuda_graphs = options.cuda_graphs,
                                          .postprocess = postprocess,
                                          .channels_last_decoder = options.channels_last_decoder});
    if (!pipeline.ok()) return pipeline.status();
    auto replica = std::make_unique<Replica>();
    replica->pipeline = *std::move(pipeline);
    replica->device = device.get();
    model.replicas.push_back(std::move(replica));
  }
  return absl::OkStatus();
}

absl::Status Engine::State::AddBatcher(Model& model) {
  const BatcherOptions bopts{.max_batch_size = MaxBatchSize(model.manifest, options),
                             .max_queue_delay = options.max_queue_delay,
                             .max_queued_images = options.max_queued_images,
                             .allowed_batch_sizes = options.allowed_batch_sizes,
                             .clock = clock};
  Model* raw = &model;
  absl::StatusOr<std::unique_ptr<DynamicBatcher<WorkItem>>> batcher =
      DynamicBatcher<WorkItem>::Create(
          bopts,
          [](const WorkItem& item, absl::Time now) { return item.request->CheckRunnable(now); },
          [this, raw](WorkItem item, absl::Status status) {
            FailRequest(item.request, status);
            events()->OnQueueDepth(raw->info.name, raw->batcher->queued_images());
          });
  if (!batcher.ok()) return batcher.status();
  model.batcher = *std::move(batcher);
  return absl::OkStatus();
}

absl::Status Engine::State::ChooseDefaultModel() {
  if (options.default_model.empty()) {
    default_model = models.front().get();
  } else {
    auto it = by_name.find(options.default_model);
    if (it == by_name.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "default_model '", options.default_model, "' is not one of the loaded models"));
    }
    default_model = it->second;
  }
  default_model->info.is_default = true;
  return absl::OkStatus();
}

void Engine::StartWorkers(Model& model) {
  State& st = *state_;
  absl::MutexLock lock(&st.shutdown_mu);  // Shutdown joins the workers started before it
  if (st.shut_down) return;
  for (auto& replica : model.replicas) {
    Replica* r = replica.get();
    for (int i = 0; i < st.options.instances_per_device; ++i) {
      r->workers.emplace_back([this, m = &model, r] { WorkerLoop(m, r); });
    }
  }
}

void Engine::SetListener(EngineListener* listener) { state_->listener.store(listener); }

absl::Status Engine::Warmup() {
  for (auto& model : state_->models) {
    const absl::Time start = state_->clock->Now();
    const std::string context = absl::StrCat("warm-up of model '", model->info.name, "'");
    if (absl::Status s = WarmupModel(*model); !s.ok()) return WithContext(s, context);
    StartWorkers(*model);
    model->ready.store(true);
    state_->events()->OnModelReady(model->info.name, true);
    spdlog::info("model '{}' warmed up in {}", model->info.name,
                 absl::FormatDuration(state_->clock->Now() - start));
  }
  return absl::OkStatus();
}

absl::Status Engine::WarmupModel(Model& model) {
  for (auto& replica : model.replicas) {
    for (int run = 0; run < state_->options.warmup_runs; ++run) {
      if (absl::Status s = replica->pipeline->Warmup(); !s.ok()) return s;
    }
    // After the eager passes: TorchScript has optimised its graphs by then.
    absl::StatusOr<int> graphs = replica->pipeline->CaptureGraphs();
    if (!graphs.ok()) return graphs.status();
  }
  return ChooseBatchSizes(model);
}

absl::Status Engine::ChooseBatchSizes(Model& model) {
  State& st = *state_;
  const int cap = MaxBatchSize(model.manifest, st.options);
  BatchTuningOptions tuning{.concurrency = st.options.instances_per_device,
                            .min_time = st.options.batch_tuning_time};
  for (const int b : model.manifest.batch_sizes) {
    if (b <= cap) tuning.batch_sizes.push_back(b);
  }
  const ImageSize size = model.info.supported_sizes[0];
  for (auto& replica : model.replicas) {
    DeviceBatching& batching = replica->batching;
    batching = {.device = replica->device->name, .max_batch_size = cap};
    if (st.options.max_batch_size == 0) {
      const Pipeline& pipeline = *replica->pipeline;
      absl::StatusOr<BatchSizeChoice> choice = TuneBatchSize(tuning, [&](int batch_size) {
        return pipeline.Run(TuningBatch(model.manifest, batch_size), size.width, size.height)
            .status();
      });
      if (!choice.ok()) return WithContext(choice.status(), "batch-size measurement");
      batching.max_batch_size = choice->max_batch_size;
      batching.measured = choice->measured;
      spdlog::info("model '{}' on {}: measured batch sizes {}", model.info.name, batching.device,
                   choice->Describe());
    }
    st.events()->OnBatchSizeChosen(model.info.name, batching.device, batching.max_batch_size);
    model.batching.push_back(batching);
  }
  return absl::OkStatus();
}

bool Engine::ready() const {
  if (!state_->accepting.load()) return false;
  for (const auto& model : state_->models) {
    if (!model->ready.load()) return false;
  }
  return true;
}

absl::StatusOr<Engine::Model*> Engine::FindModel(std::string_view name) const {
  if (name.empty()) return state_->default_model;
  auto it = state_->by_name.find(name);
  if (it == state_->by_name.end()) {
    std::vector<std::string> names;
    for (const auto& [n, m] : state_->by_name) names.push_back(n);
    return absl::NotFoundError(absl::StrCat(
        "model '", std::string(name), "' is not served; models: ", absl::StrJoin(names, ", ")));
  }
  return it->second;
}

absl::StatusOr<std::string> Engine::ResolveModel(std::string_view name) const {
  absl::StatusOr<Model*> model = FindModel(name);
  if (!model.ok()) return model.status();
  return (*model)->info.name;
}

std::vector<std::string> Engine::Devices() const {
  std::vector<std::string> names;
  for (const auto& device : state_->devices) names.push_back(device->name);
  return names;
}

std::vector<ModelInfo> Engine::ListModels() const {
  std::vector<ModelInfo> out;
  for (const auto& model : state_->models) {
    const bool ready = model->ready.load();  // stored after warm-up has written `batching`
    out.push_back(model->info);
    if (ready) out.back().batching = model->batching;
    out.back().ready = ready && state_->accepting.load();
  }
  return out;
}

absl::StatusOr<TokenizeResult> Engine::Tokenize(std::string_view model_name,
                                                std::string_view text) const {
  absl::StatusOr<Model*> model = FindModel(model_name);
  if (!model.ok()) return model.status();
  const Model& m = **model;
  absl::StatusOr<ClipTokenizer::ModelInput> input =
      m.tokenizer->EncodeForModel(text, m.manifest.tokenizer.max_length);
  if (!input.ok()) return WithContext(input.status(), "text");
  TokenizeResult result;
  result.model = m.info.name;
  result.ids = std::move(input->ids);
  result.input_ids = std::move(input->input_ids);
  result.truncated_tokens = input->truncated_tokens;
  result.tokens.reserve(result.ids.size());
  for (int32_t id : result.ids) result.tokens.push_back(m.tokenizer->TokenString(id));
  return result;
}

absl::Status Engine::Submit(GenerateParams params, GenerateCallbacks callbacks) {
  State& st = *state_;
  if (!callbacks.on_done) return absl::InvalidArgumentError("callbacks.on_done is required");
  if (!st.accepting.load()) return absl::UnavailableError("the server is shutting down");
  absl::StatusOr<Model*> found = FindModel(params.model);
  if (!found.ok()) return found.status();
  Model& model = **found;
  if (!model.ready.load()) {
    return absl::UnavailableError(absl::StrCat("model '", model.info.name, "' is not ready yet"));
  }
  if (params.num_images < 1 || params.num_images > model.info.max_images_per_request) {
    return absl::InvalidArgumentError(absl::StrCat("num_images is ", params.num_images, "; model '",
                                                   model.info.name, "' allows 1..",
                                                   model.info.max_images_per_request));
  }
  int size_index = 0;  // default size
  if (params.width != 0 || params.height != 0) {
    size_index = model.manifest.SizeIndex(params.width, params.height);
    if (size_index < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "width x height ", params.width, "x", params.height, " is not supported by model '",
          model.info.name, "'; supported: ", model.manifest.SupportedSizesText()));
    }
  }
  absl::StatusOr<ClipTokenizer::ModelInput> tokens =
      model.tokenizer->EncodeForModel(params.prompt, model.manifest.tokenizer.max_length);
  if (!tokens.ok()) return WithContext(tokens.status(), "prompt");

  auto request = std::make_shared<Request>();
  request->seed = params.seed.has_value() ? *params.seed : absl::Uniform<uint64_t>(absl::BitGen());
  request->model = model.info.name;
  request->input_ids = std::move(tokens->input_ids);
  request->truncated_tokens = tokens->truncated_tokens;
  request->clock = st.clock;
  request->accepted = st.clock->Now();
  const int n = params.num_images;
  request->params = std::move(params);
  request->callbacks = std::move(callbacks);
  {
    absl::MutexLock lock(&request->mu);
    request->remaining = n;
    if (!request->callbacks.on_image) request->images.resize(n);
  }
  std::vector<WorkItem> items;
  items.reserve(n);
  for (int i = 0; i < n; ++i) items.push_back(WorkItem{request, i});
  absl::Status enqueued = model.batcher->Enqueue(size_index, std::move(items));
  st.events()->OnQueueDepth(model.info.name, model.batcher->queued_images());
  return enqueued;
}

void Engine::WorkerLoop(Model* model, Replica* replica) {
  const int max_items = replica->batching.max_batch_size;
  while (std::optional<DynamicBatcher<WorkItem>::Batch> batch =
             model->batcher->NextBatch(max_items)) {
    state_->events()->OnQueueDepth(model->info.name, model->batcher->queued_images());
    RunBatch(model, replica, batch->key, std::move(batch->items), batch->padded_size);
  }
}

void Engine::RunBatch(Model* model, Replica* replica, int size_index, std::vector<WorkItem> items,
                      int padded_size) {
  State& st = *state_;
  const ImageSize size = model->info.supported_sizes[size_index];
  const int n = static_cast<int>(items.size());
  const absl::Time start = st.clock->Now();
  for (const WorkItem& item : items) item.request->EnterBatch(start, n);
  absl::StatusOr<Pipeline::Output> output =
      st.RunOnDevice(*model, *replica, items, padded_size, size);
  if (!output.ok()) {
    spdlog::error("model '{}' failed on a batch of {} on {}: {}", model->info.name, n,
                  replica->device->name, std::string(output.status().message()));
    const absl::Status status = BatchFailure(model->info.name, n, output.status());
    for (WorkItem& item : items) FailRequest(item.request, status);
    return;
  }
  for (const WorkItem& item : items) item.request->SetStageTimes(output->timings);
  for (int i = 0; i < n; ++i) {
    st.encoders->Schedule([this, model, size, item = std::move(items[i]),
                           pixels = std::move(output->images[i])]() mutable {
      EncodeImage(*model, size, std::move(item), std::move(pixels));
    });
  }
}

absl::StatusOr<Pipeline::Output> Engine::State::RunOnDevice(const Model& model, Replica& replica,
                                                            const std::vector<WorkItem>& items,
                                                            int padded_size, ImageSize size) {
  std::vector<Pipeline::Input> inputs;
  inputs.reserve(padded_size);
  for (const WorkItem& item : items) inputs.push_back(item.input());
  while (static_cast<int>(inputs.size()) < padded_size) inputs.push_back(inputs.back());
  DeviceState& device = *replica.device;
  device.busy.BatchStarted(clock->Now());
  absl::StatusOr<Pipeline::Output> output = replica.pipeline->Run(inputs, size.width, size.height);
  const absl::Duration busy = device.busy.BatchFinished(clock->Now());
  ReportBatch(model, device, static_cast<int>(items.size()), padded_size, output, busy);
  return output;
}

void Engine::State::ReportBatch(const Model& model, const DeviceState& device, int images,
                                int padded_size, const absl::StatusOr<Pipeline::Output>& output,
                                absl::Duration busy) {
  BatchStats stats{.model = model.info.name,
                   .images = images,
                   .padded_size = padded_size,
                   .ok = output.ok(),
                   .device = device.name};
  if (output.ok()) {
    stats.padded_size = std::max(padded_size, output->run_batch_size);
    stats.text_encoder = output->timings.text_encoder;
    stats.generator = output->timings.generator;
    stats.decoder = output->timings.decoder;
    stats.total = output->timings.total;
    stats.cuda_graph = output->cuda_graph;
  }
  events()->OnBatchDone(stats);
  DeviceStats device_stats{.device = device.name, .busy = busy};
  if (device.cuda) {
    if (absl::StatusOr<DeviceMemory> memory = QueryDeviceMemory(device.name); memory.ok()) {
      device_stats.memory_used_bytes = memory->used_bytes;
      device_stats.memory_total_bytes = memory->total_bytes;
    }
  }
  events()->OnDeviceStats(device_stats);
}

void Engine::EncodeImage(const Model& model, ImageSize size, WorkItem item, std::string pixels) {
  State& st = *state_;
  const absl::Time start = st.clock->Now();
  GeneratedImage image;
  image.index = item.index;
  image.seed = item.seed();
  image.width = size.width;
  image.height = size.height;
  image.channels = model.info.channels;
  image.encoding = item.request->params.encoding;
  if (image.encoding == ImageEncoding::kRaw) {
    image.data = std::move(pixels);
  } else {
    absl::StatusOr<std::string> png =
        EncodePng(reinterpret_cast<const uint8_t*>(pixels.data()), size.width, size.height,
                  image.channels, st.options.png_compression_level);
    if (!png.ok()) {
      spdlog::error("PNG encoding failed: {}", std::string(png.status().message()));
      FailRequest(item.request, absl::InternalError("PNG encoding failed"));
      return;
    }
    image.data = *std::move(png);
    image.encode_time = st.clock->Now() - start;
    st.events()->OnImageEncoded(model.info.name, image.encode_time);
  }
  FinishImage(item.request, std::move(image));
}

void Engine::FinishImage(const std::shared_ptr<Request>& request, GeneratedImage image) {
  Request& r = *request;
  GenerateResult result;
  {
    absl::MutexLock lock(&r.mu);
    if (r.finished) return;
    r.timings.encode += image.encode_time;
    --r.remaining;
    if (r.callbacks.on_image) {
      r.callbacks.on_image(std::move(image), r.ResultSoFar());
    } else {
      const int index = image.index;
      r.images[index] = std::move(image);
    }
    if (r.remaining > 0) return;
    r.finished = true;
    result = r.ResultSoFar();
    result.images = std::move(r.images);
  }
  r.callbacks.on_done(absl::OkStatus(), std::move(result));
}

void Engine::FailRequest(const std::shared_ptr<Request>& request, absl::Status status) {
  Request& r = *request;
  GenerateResult result;
  {
    absl::MutexLock lock(&r.mu);
    if (r.finished) return;
    r.finished = true;
    result = r.ResultSoFar();
  }
  r.callbacks.on_done(std::move(status), std::move(result));
}

void Engine::Shutdown() {
  State& st = *state_;
  {
    absl::MutexLock lock(&st.shutdown_mu);
    if (st.shut_down) return;
    st.shut_down = true;
  }
  st.accepting.store(false);
  for (auto& model : st.models) model->batcher->Shutdown();
  for (auto& model : st.models) {
    for (auto& replica : model->replicas) {
      for (std::thread& t : replica->workers) t.join();
    }
    st.events()->OnModelReady(model->info.name, false);
  }
  st.encoders.reset();  // runs every scheduled encode, so every accepted request finishes
}

}  // namespace dmdserve
