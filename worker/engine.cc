// Engine serving: Submit, the model workers, the encode stage, Shutdown. Start-up (Create,
// Warmup) is in engine_startup.cc; the private structs are in engine_internal.h.
#include "worker/engine.h"

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
#include "worker/engine_internal.h"
#include "worker/image_codec.h"
#include "worker/model_manifest.h"
#include "worker/pipeline.h"
#include "worker/thread_pool.h"

namespace dmdserve {

using engine_internal::WithContext;

Engine::Engine(Options options) : state_(std::make_unique<State>()) {
  state_->options = std::move(options);
  state_->clock = state_->options.clock != nullptr ? state_->options.clock : RealClock::Get();
}

Engine::~Engine() { Shutdown(); }

namespace {

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
  absl::StatusOr<ClipTokenizer::ModelInput> tokens_2 = ClipTokenizer::ModelInput();
  if (model.tokenizer_2 != nullptr) {
    tokens_2 = model.tokenizer_2->EncodeForModel(params.prompt, model.manifest.tokenizer.max_length);
    if (!tokens_2.ok()) return WithContext(tokens_2.status(), "prompt");
  }

  auto request = std::make_shared<Request>();
  request->seed = params.seed.has_value() ? *params.seed : absl::Uniform<uint64_t>(absl::BitGen());
  request->model = model.info.name;
  request->input_ids = std::move(tokens->input_ids);
  request->input_ids_2 = std::move(tokens_2->input_ids);
  request->truncated_tokens = std::max(tokens->truncated_tokens, tokens_2->truncated_tokens);
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

void Engine::Shutdown(absl::Duration grace) {
  State& st = *state_;
  {
    absl::MutexLock lock(&st.shutdown_mu);
    if (st.shut_down) return;
    st.shut_down = true;
  }
  st.accepting.store(false);
  for (auto& model : st.models) model->batcher->Shutdown();
  st.DrainQueues(grace);
  for (auto& model : st.models) {
    for (auto& replica : model->replicas) {
      for (std::thread& t : replica->workers) t.join();
    }
    st.events()->OnModelReady(model->info.name, false);
  }
  st.encoders.reset();  // runs every scheduled encode, so every accepted request finishes
}

void Engine::State::DrainQueues(absl::Duration grace) {
  const absl::Time deadline = absl::Now() + grace;
  auto queued = [this] {
    int images = 0;
    for (auto& model : models) images += model->batcher->queued_images();
    return images;
  };
  constexpr absl::Duration kPoll = absl::Milliseconds(10);
  while (queued() > 0 && absl::Now() < deadline) {
    absl::SleepFor(std::min(kPoll, deadline - absl::Now()));
  }
  const absl::Status cancelled = absl::CancelledError(absl::StrCat(
      "the server shut down before this request ran (drain grace of ",
      absl::FormatDuration(grace), " ended)"));
  int images = 0;
  for (auto& model : models) images += model->batcher->CancelQueued(cancelled);
  if (images > 0) {
    spdlog::warn("drain grace of {} ended: cancelled {} queued image(s)",
                 absl::FormatDuration(grace), images);
  }
}

}  // namespace dmdserve
