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
#include "worker/device.h"
#include "worker/image_codec.h"
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
};

// One image of a request: the batching unit.
struct Engine::WorkItem {
  std::shared_ptr<Request> request;
  int index = 0;
};

// Busy-time accounting of one device, shared by the worker groups of every model on it: the
// device is busy while at least one batch runs on it.
struct Engine::DeviceState {
  std::string name;  // "cpu", "cuda:N"
  bool cuda = false;
  absl::Mutex mu;
  int running ABSL_GUARDED_BY(mu) = 0;            // batches running now
  absl::Time since ABSL_GUARDED_BY(mu);           // when `running` last changed
  absl::Duration unreported ABSL_GUARDED_BY(mu);  // busy time not reported yet

  void BatchStarted(absl::Time now) {
    absl::MutexLock lock(&mu);
    if (running > 0) unreported += now - since;
    since = now;
    ++running;
  }
  // The busy time to report now (including that of batches still running).
  absl::Duration BatchFinished(absl::Time now) {
    absl::MutexLock lock(&mu);
    unreported += now - since;
    since = now;
    --running;
    return std::exchange(unreported, absl::ZeroDuration());
  }
};

// A model's worker group on one device: its pipeline there (one execution instance per worker)
// and the worker threads.
struct Engine::Replica {
  std::unique_ptr<Pipeline> pipeline;
  DeviceState* device = nullptr;
  std::vector<std::thread> workers;
};

struct Engine::Model {
  ModelManifest manifest;
  std::unique_ptr<ClipTokenizer> tokenizer;
  std::vector<std::unique_ptr<Replica>> replicas;     // one per device, in Options order
  std::unique_ptr<DynamicBatcher<WorkItem>> batcher;  // key: index into info.supported_sizes
  ModelInfo info;  // static part; `ready` lives in the atomic below
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
  if (o.instances_per_device < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("instances_per_device must be >= 1, got ", o.instances_per_device));
  }
  if (o.intra_op_threads < 0) return absl::InvalidArgumentError("intra_op_threads must be >= 0");
  if (o.max_batch_size < 0) return absl::InvalidArgumentError("max_batch_size must be >= 0");
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

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(Options options) {
  if (absl::Status s = ValidateOptions(options); !s.ok()) return s;
  std::unique_ptr<Engine> engine(new Engine(std::move(options)));
  State& st = *engine->state_;
  const Options& o = st.options;
  torch::jit::setGraphExecutorOptimize(o.jit_optimize);
  absl::StatusOr<std::vector<std::string>> devices = ResolveDevices(o.devices);
  if (!devices.ok()) return devices.status();
  for (const std::string& name : *devices) {
    auto device = std::make_unique<DeviceState>();
    device->name = name;
    device->cuda = name != "cpu";
    st.devices.push_back(std::move(device));
  }
  absl::StatusOr<Pipeline::Postprocess> postprocess = Pipeline::ParsePostprocess(o.postprocess);
  if (!postprocess.ok()) return postprocess.status();

  absl::StatusOr<std::unique_ptr<ThreadPool>> encoders =
      ThreadPool::Create({.num_threads = o.encode_threads});
  if (!encoders.ok()) return encoders.status();
  st.encoders = *std::move(encoders);

  for (const std::string& dir : o.model_dirs) {
    const std::string where = absl::StrCat("model bundle ", dir);
    auto model = std::make_unique<Model>();
    absl::StatusOr<ModelManifest> manifest = ModelManifest::Load(dir);
    if (!manifest.ok()) return WithContext(manifest.status(), where);
    model->manifest = *std::move(manifest);
    if (absl::Status s = ApplyDTypeOverride(o.dtype, model->manifest.dtypes); !s.ok()) return s;
    const ModelManifest& m = model->manifest;
    if (st.by_name.count(m.name) > 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": model name '", m.name, "' is already served by another bundle"));
    }

    ClipTokenizer::Options tok;
    tok.vocab_path = m.tokenizer.vocab_path;
    tok.merges_path = m.tokenizer.merges_path;
    tok.bos_token = m.tokenizer.bos_token;
    tok.eos_token = m.tokenizer.eos_token;
    tok.pad_token = m.tokenizer.pad_token;
    absl::StatusOr<std::unique_ptr<ClipTokenizer>> tokenizer = ClipTokenizer::Create(tok);
    if (!tokenizer.ok()) return WithContext(tokenizer.status(), where);
    model->tokenizer = *std::move(tokenizer);
    absl::StatusOr<ClipTokenizer::ModelInput> uncond =
        model->tokenizer->EncodeForModel("", m.tokenizer.max_length);
    if (!uncond.ok()) return WithContext(uncond.status(), where);

    for (const std::unique_ptr<DeviceState>& device : st.devices) {
      Pipeline::Options popts;
      popts.device = device->name;
      popts.intra_op_threads = o.intra_op_threads;
      popts.uncond_input_ids = uncond->input_ids;
      popts.instances = o.instances_per_device;
      popts.cuda_graphs = o.cuda_graphs;
      popts.postprocess = *postprocess;
      absl::StatusOr<std::unique_ptr<Pipeline>> pipeline = Pipeline::Create(m, popts);
      if (!pipeline.ok()) return WithContext(pipeline.status(), where);
      auto replica = std::make_unique<Replica>();
      replica->pipeline = *std::move(pipeline);
      replica->device = device.get();
      model->replicas.push_back(std::move(replica));
    }

    const int model_max_batch = m.max_batch_size();
    BatcherOptions bopts;
    bopts.max_batch_size =
        o.max_batch_size == 0 ? model_max_batch : std::min(o.max_batch_size, model_max_batch);
    bopts.max_queue_delay = o.max_queue_delay;
    bopts.max_queued_images = o.max_queued_images;
    bopts.allowed_batch_sizes = o.allowed_batch_sizes;
    bopts.clock = st.clock;
    Model* raw = model.get();
    absl::StatusOr<std::unique_ptr<DynamicBatcher<WorkItem>>> batcher =
        DynamicBatcher<WorkItem>::Create(
            bopts,
            [](const WorkItem& item, absl::Time now) -> absl::Status {
              Request& r = *item.request;
              // Held across is_cancelled(): whatever it refers to (the RPC's context) lives until
              // on_done, which runs only after `finished` is set under this lock.
              absl::MutexLock lock(&r.mu);
              if (r.finished) return absl::CancelledError("request already finished");
              if (now >= r.params.deadline) {
                return absl::DeadlineExceededError(
                    "the request's deadline passed while it waited in the queue");
              }
              if (r.callbacks.is_cancelled && r.callbacks.is_cancelled()) {
                return absl::CancelledError("the client cancelled the request");
              }
              return absl::OkStatus();
            },
            [&st, raw](WorkItem item, absl::Status status) {
              FailRequest(item.request, status);
              st.events()->OnQueueDepth(raw->info.name, raw->batcher->queued_images());
            });
    if (!batcher.ok()) return WithContext(batcher.status(), "batcher options");
    model->batcher = *std::move(batcher);

    ModelInfo& info = model->info;
    info.name = m.name;
    info.description = m.description;
    info.width = m.width;
    info.height = m.height;
    info.channels = m.channels;
    info.steps = static_cast<int>(m.schedule.timesteps.size());
    info.max_images_per_request =
        o.max_images_per_request == 0
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
    st.by_name.emplace(m.name, raw);
    st.models.push_back(std::move(model));
    spdlog::info(
        "loaded model '{}' from {} ({}x{}x{}, {} step(s), max batch {}, dtypes {}/{}/{}) on {}",
        info.name, dir, info.width, info.height, info.channels, info.steps, bopts.max_batch_size,
        DTypeName(m.dtypes.text_encoder), DTypeName(m.dtypes.generator),
        DTypeName(m.dtypes.decoder), absl::StrJoin(*devices, ", "));
  }

  if (o.default_model.empty()) {
    st.default_model = st.models.front().get();
  } else {
    auto it = st.by_name.find(o.default_model);
    if (it == st.by_name.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("default_model '", o.default_model, "' is not one of the loaded models"));
    }
    st.default_model = it->second;
  }
  st.default_model->info.is_default = true;

  Engine* self = engine.get();
  for (auto& model : st.models) {
    Model* m = model.get();
    for (auto& replica : m->replicas) {
      Replica* r = replica.get();
      for (int i = 0; i < o.instances_per_device; ++i) {
        r->workers.emplace_back([self, m, r] { self->WorkerLoop(m, r); });
      }
    }
  }
  return engine;
}

void Engine::SetListener(EngineListener* listener) { state_->listener.store(listener); }

absl::Status Engine::Warmup() {
  for (auto& model : state_->models) {
    const absl::Time start = absl::Now();
    const std::string context = absl::StrCat("warm-up of model '", model->info.name, "'");
    for (auto& replica : model->replicas) {
      for (int run = 0; run < state_->options.warmup_runs; ++run) {
        if (absl::Status s = replica->pipeline->Warmup(); !s.ok()) return WithContext(s, context);
      }
      // After the eager passes: TorchScript has optimised its graphs by then.
      absl::StatusOr<int> graphs = replica->pipeline->CaptureGraphs();
      if (!graphs.ok()) return WithContext(graphs.status(), context);
    }
    model->ready.store(true);
    state_->events()->OnModelReady(model->info.name, true);
    spdlog::info("model '{}' warmed up in {}", model->info.name,
                 absl::FormatDuration(absl::Now() - start));
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
    out.push_back(model->info);
    out.back().ready = model->ready.load() && state_->accepting.load();
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
  while (std::optional<DynamicBatcher<WorkItem>::Batch> batch = model->batcher->NextBatch()) {
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
  for (const WorkItem& item : items) {
    Request& r = *item.request;
    absl::MutexLock lock(&r.mu);
    if (!r.started) {
      r.started = true;
      r.timings.queue = start - r.accepted;
    }
    r.timings.batch_size = std::max(r.timings.batch_size, n);
  }

  std::vector<Pipeline::Input> inputs;
  inputs.reserve(padded_size);
  for (const WorkItem& item : items) {
    inputs.push_back({item.request->input_ids, item.request->seed + item.index});
  }
  while (static_cast<int>(inputs.size()) < padded_size) inputs.push_back(inputs.back());

  DeviceState& device = *replica->device;
  device.BatchStarted(absl::Now());
  absl::StatusOr<Pipeline::Output> output = replica->pipeline->Run(inputs, size.width, size.height);
  DeviceStats device_stats{.device = device.name, .busy = device.BatchFinished(absl::Now())};
  BatchStats stats{.model = model->info.name,
                   .images = n,
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
  st.events()->OnBatchDone(stats);
  if (device.cuda) {
    if (absl::StatusOr<DeviceMemory> memory = QueryDeviceMemory(device.name); memory.ok()) {
      device_stats.memory_used_bytes = memory->used_bytes;
      device_stats.memory_total_bytes = memory->total_bytes;
    }
  }
  st.events()->OnDeviceStats(device_stats);
  if (!output.ok()) {
    spdlog::error("model '{}' failed on a batch of {} on {}: {}", model->info.name, n, device.name,
                  std::string(output.status().message()));
    const absl::Status status =
        output.status().code() == absl::StatusCode::kResourceExhausted
            ? absl::ResourceExhaustedError(absl::StrCat(
                  "model '", model->info.name, "' ran out of device memory on a batch of ", n,
                  " image(s); retry later or ask for fewer images"))
            : absl::InternalError(
                  absl::StrCat("model '", model->info.name, "' failed to generate the image"));
    for (WorkItem& item : items) FailRequest(item.request, status);
    return;
  }
  for (WorkItem& item : items) {
    Request& r = *item.request;
    absl::MutexLock lock(&r.mu);
    r.timings.text_encoder = stats.text_encoder;
    r.timings.generator = stats.generator;
    r.timings.decoder = stats.decoder;
  }

  const int channels = model->info.channels;
  const int level = st.options.png_compression_level;
  for (int i = 0; i < n; ++i) {
    st.encoders->Schedule([this, model, size, channels, level, item = std::move(items[i]),
                           pixels = std::move(output->images[i])]() mutable {
      const absl::Time t0 = absl::Now();
      GeneratedImage image;
      image.index = item.index;
      image.seed = item.request->seed + item.index;
      image.width = size.width;
      image.height = size.height;
      image.channels = channels;
      image.encoding = item.request->params.encoding;
      if (image.encoding == ImageEncoding::kRaw) {
        image.data = std::move(pixels);
      } else {
        absl::StatusOr<std::string> png = EncodePng(reinterpret_cast<const uint8_t*>(pixels.data()),
                                                    size.width, size.height, channels, level);
        if (!png.ok()) {
          spdlog::error("PNG encoding failed: {}", std::string(png.status().message()));
          FailRequest(item.request, absl::InternalError("PNG encoding failed"));
          return;
        }
        image.data = *std::move(png);
        image.encode_time = absl::Now() - t0;
        state_->events()->OnImageEncoded(model->info.name, image.encode_time);
      }
      FinishImage(item.request, std::move(image));
    });
  }
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
      GenerateResult so_far;
      so_far.model = r.model;
      so_far.truncated_tokens = r.truncated_tokens;
      so_far.timings = r.timings;
      so_far.timings.total = r.clock->Now() - r.accepted;
      r.callbacks.on_image(std::move(image), so_far);
    } else {
      const int index = image.index;
      r.images[index] = std::move(image);
    }
    if (r.remaining > 0) return;
    r.finished = true;
    r.timings.total = r.clock->Now() - r.accepted;
    result.model = r.model;
    result.images = std::move(r.images);
    result.timings = r.timings;
    result.truncated_tokens = r.truncated_tokens;
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
    r.timings.total = r.clock->Now() - r.accepted;
    result.model = r.model;
    result.timings = r.timings;
    result.truncated_tokens = r.truncated_tokens;
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
