// Engine start-up: Create (options, threads, devices, bundles) and Warmup (warm-up passes, CUDA
// graphs, batch-size measurement, model workers). Serving is in engine.cc.
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "spdlog/spdlog.h"
#include "worker/batch_size_tuner.h"
#include "worker/cpu_budget.h"
#include "worker/engine.h"
#include "worker/engine_internal.h"
#include "worker/malloc_tuning.h"

namespace dmdserve {
namespace engine_internal {

absl::Status WithContext(const absl::Status& s, absl::string_view context) {
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

// The largest batch the engine forms for model `m`.
int MaxBatchSize(const ModelManifest& m, const Engine::Options& o) {
  const int model_max_batch = m.max_batch_size();
  return o.max_batch_size == 0 ? model_max_batch : std::min(o.max_batch_size, model_max_batch);
}

}  // namespace engine_internal

using engine_internal::MaxBatchSize;
using engine_internal::WithContext;

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
    if (MallocTuningApplies()) {
      spdlog::info("malloc: glibc mmap threshold {} MiB, trim threshold {} MiB",
                   tuning.mmap_threshold_bytes >> 20, tuning.trim_threshold_bytes >> 20);
    } else {
      spdlog::info("malloc: a sanitizer's allocator replaces glibc's, nothing to tune");
    }
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
  const bool on_cpu =
      std::any_of(devices.begin(), devices.end(), [](const auto& device) { return !device->cuda; });
  const CpuBudget budget = ReadCpuBudget();
  const CpuThreadPlan plan = dmdserve::PlanThreads(
      budget.usable_cpus, on_cpu, options.instances_per_device, options.intra_op_threads);
  const auto origin = [](int given) { return given > 0 ? "given" : "derived"; };
  spdlog::info(
      "CPU budget: {}; {} model worker(s) per model and device ({}) x {} intra-op "
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
  absl::StatusOr<EmptyPrompt> empty_prompt = LoadTokenizers(*model);
  if (!empty_prompt.ok()) return WithContext(empty_prompt.status(), where);
  if (absl::Status s = AddReplicas(*model, *empty_prompt, postprocess); !s.ok()) {
    return WithContext(s, where);
  }
  if (absl::Status s = AddBatcher(*model); !s.ok()) return WithContext(s, "batcher options");
  const ModelManifest& m = model->manifest;
  const ModelInfo& info = model->info = MakeModelInfo(m, options);
  const auto append_name = [](std::string* out, const auto& device) { out->append(device->name); };
  spdlog::info(
      "loaded model '{}' from {} ({}x{}x{}, {} step(s), max batch {}, dtypes {}/{}/{}) on {}",
      info.name, dir, info.width, info.height, info.channels, info.steps, MaxBatchSize(m, options),
      DTypeName(m.dtypes.text_encoder), DTypeName(m.dtypes.generator), DTypeName(m.dtypes.decoder),
      absl::StrJoin(devices, ", ", append_name));
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
    return absl::InvalidArgumentError(absl::StrCat(where, ": model name '", model.manifest.name,
                                                   "' is already served by another bundle"));
  }
  return absl::OkStatus();
}

namespace {

// A manifest tokenizer block's ClipTokenizer and its encoding of the empty prompt.
absl::StatusOr<std::unique_ptr<ClipTokenizer>> MakeTokenizer(const ModelManifest::Tokenizer& t,
                                                              std::vector<int32_t>* empty_prompt) {
  absl::StatusOr<std::unique_ptr<ClipTokenizer>> tokenizer =
      ClipTokenizer::Create({.vocab_path = t.vocab_path,
                             .merges_path = t.merges_path,
                             .bos_token = t.bos_token,
                             .eos_token = t.eos_token,
                             .pad_token = t.pad_token});
  if (!tokenizer.ok()) return tokenizer.status();
  absl::StatusOr<ClipTokenizer::ModelInput> empty = (*tokenizer)->EncodeForModel("", t.max_length);
  if (!empty.ok()) return empty.status();
  *empty_prompt = std::move(empty->input_ids);
  return tokenizer;
}

}  // namespace

absl::StatusOr<Engine::State::EmptyPrompt> Engine::State::LoadTokenizers(Model& model) const {
  EmptyPrompt empty_prompt;
  absl::StatusOr<std::unique_ptr<ClipTokenizer>> tokenizer =
      MakeTokenizer(model.manifest.tokenizer, &empty_prompt.input_ids);
  if (!tokenizer.ok()) return WithContext(tokenizer.status(), "tokenizer");
  model.tokenizer = *std::move(tokenizer);
  if (model.manifest.tokenizer_2.has_value()) {
    tokenizer = MakeTokenizer(*model.manifest.tokenizer_2, &empty_prompt.input_ids_2);
    if (!tokenizer.ok()) return WithContext(tokenizer.status(), "tokenizer_2");
    model.tokenizer_2 = *std::move(tokenizer);
  }
  return empty_prompt;
}

absl::Status Engine::State::AddReplicas(Model& model, const EmptyPrompt& empty_prompt,
                                        Pipeline::Postprocess postprocess) const {
  for (const std::unique_ptr<DeviceState>& device : devices) {
    absl::StatusOr<std::unique_ptr<Pipeline>> pipeline =
        Pipeline::Create(model.manifest, {.device = device->name,
                                          .intra_op_threads = options.intra_op_threads,
                                          .uncond_input_ids = empty_prompt.input_ids,
                                          .uncond_input_ids_2 = empty_prompt.input_ids_2,
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
      return absl::InvalidArgumentError(absl::StrCat("default_model '", options.default_model,
                                                     "' is not one of the loaded models"));
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
        return pipeline
            .Run(Pipeline::SyntheticBatch(model.manifest, batch_size), size.width, size.height)
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

}  // namespace dmdserve
