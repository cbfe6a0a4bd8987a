#include "server/metrics.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "worker/device.h"

namespace dmdserve {
namespace {

constexpr std::string_view kUnknownModel = "_unknown";

// Seconds: from sub-millisecond GPU stages to multi-second CPU requests.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

prometheus::Histogram::BucketBoundaries BatchBuckets() { return {1, 2, 4, 8, 16, 32, 64, 128}; }

// gRPC code names as used in label values ("OK", "INVALID_ARGUMENT", ...).
constexpr std::array<std::string_view, kNumGrpcCodes> kCodeNames = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};

// Index of `code` in kCodeNames (and in PerModel::requests); codes out of range count as UNKNOWN.
int CodeIndex(grpc::StatusCode code) {
  constexpr int kUnknown = static_cast<int>(grpc::StatusCode::UNKNOWN);
  static_assert(kCodeNames[kUnknown] == "UNKNOWN");
  const int c = static_cast<int>(code);
  return c >= 0 && c < kNumGrpcCodes ? c : kUnknown;
}

}  // namespace

std::string_view GrpcCodeName(grpc::StatusCode code) { return kCodeNames[CodeIndex(code)]; }

std::string_view RpcMethodName(RpcMethod method) {
  switch (method) {
    case RpcMethod::kGenerate:
      return "Generate";
    case RpcMethod::kGenerateStream:
      return "GenerateStream";
    case RpcMethod::kListModels:
      return "ListModels";
    case RpcMethod::kTokenize:
      return "Tokenize";
    case RpcMethod::kHttpImagesGenerations:
      return "POST /v1/images/generations";
    case RpcMethod::kHttpListModels:
      return "GET /v1/models";
    case RpcMethod::kHttpGenerate:
      return "POST /v1/generate";
    case RpcMethod::kHttpGenerateStream:
      return "POST /v1/generate:stream";
    case RpcMethod::kHttpNativeListModels:
      return "POST /v1/models:list";
    case RpcMethod::kHttpTokenize:
      return "POST /v1/tokenize";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const Options& options) {
  if (options.models.empty()) return absl::InvalidArgumentError("Metrics needs at least one model");
  std::unique_ptr<Metrics> m(new Metrics());
  m->registry_ = std::make_shared<prometheus::Registry>();
  std::vector<std::string> models = options.models;
  models.emplace_back(kUnknownModel);
  for (const std::string& name : models) m->models_.emplace(name, PerModel{});
  m->AddRequestMetrics(models);
  m->AddBatchMetrics(models);
  m->AddModelStateMetrics(options.models, options.queue_capacity_images, options.devices);
  m->AddDeviceMetrics(options.devices);
  m->AddBuildInfo(options.version);
  return m;
}

void Metrics::AddRequestMetrics(const std::vector<std::string>& models) {
  auto& requests = prometheus::BuildCounter()
                       .Name("dmdserve_requests_total")
                       .Help("RPCs finished, by model, method and gRPC status code.")
                       .Register(*registry_);
  auto& images = prometheus::BuildCounter()
                     .Name("dmdserve_images_generated_total")
                     .Help("Images returned to clients.")
                     .Register(*registry_);
  auto& request_duration =
      prometheus::BuildHistogram()
          .Name("dmdserve_request_duration_seconds")
          .Help("Time from accepting a successful request to its last image, in seconds.")
          .Register(*registry_);
  auto& queue_wait = prometheus::BuildHistogram()
                         .Name("dmdserve_queue_wait_seconds")
                         .Help("Time a request waited before its first image entered a batch.")
                         .Register(*registry_);
  for (const std::string& name : models) {
    PerModel& pm = models_.at(name);
    for (int method = 0; method < kNumRpcMethods; ++method) {
      const std::string method_name(RpcMethodName(static_cast<RpcMethod>(method)));
      for (int code = 0; code < kNumGrpcCodes; ++code) {
        pm.requests[method][code] = &requests.Add(
            {{"model", name}, {"method", method_name}, {"code", std::string(kCodeNames[code])}});
      }
      pm.request_duration[method] =
          &request_duration.Add({{"model", name}, {"method", method_name}}, LatencyBuckets());
    }
    pm.images = &images.Add({{"model", name}});
    pm.queue_wait = &queue_wait.Add({{"model", name}}, LatencyBuckets());
  }
}

void Metrics::AddBatchMetrics(const std::vector<std::string>& models) {
  auto& stage = prometheus::BuildHistogram()
                    .Name("dmdserve_stage_duration_seconds")
                    .Help(
                        "Duration of a pipeline stage: per batch for text_encoder, generator "
                        "and decoder; per image for png_encode.")
                    .Register(*registry_);
  auto& batch_duration =
      prometheus::BuildHistogram()
          .Name("dmdserve_batch_duration_seconds")
          .Help("Duration of a whole pipeline run per batch, input staging to host memory.")
          .Register(*registry_);
  auto& batch_size = prometheus::BuildHistogram()
                         .Name("dmdserve_batch_size_images")
                         .Help("Real images per batch run by the model (padding excluded).")
                         .Register(*registry_);
  auto& batches = prometheus::BuildCounter()
                      .Name("dmdserve_batches_total")
                      .Help("Batches run by the model, by result (ok or error).")
                      .Register(*registry_);
  for (const std::string& name : models) {
    PerModel& pm = models_.at(name);
    pm.text_encoder = &stage.Add({{"model", name}, {"stage", "text_encoder"}}, LatencyBuckets());
    pm.generator = &stage.Add({{"model", name}, {"stage", "generator"}}, LatencyBuckets());
    pm.decoder = &stage.Add({{"model", name}, {"stage", "decoder"}}, LatencyBuckets());
    pm.png_encode = &stage.Add({{"model", name}, {"stage", "png_encode"}}, LatencyBuckets());
    pm.batch_duration = &batch_duration.Add({{"model", name}}, LatencyBuckets());
    pm.batch_size = &batch_size.Add({{"model", name}}, BatchBuckets());
    pm.batches_ok = &batches.Add({{"model", name}, {"result", "ok"}});
    pm.batches_error = &batches.Add({{"model", name}, {"result", "error"}});
  }
}

void Metrics::AddModelStateMetrics(const std::vector<std::string>& models,
                                   int queue_capacity_images,
                                   const std::vector<std::string>& devices) {
  auto& queue_depth = prometheus::BuildGauge()
                          .Name("dmdserve_queue_depth_images")
                          .Help("Images waiting in the model's batch queue.")
                          .Register(*registry_);
  auto& queue_capacity = prometheus::BuildGauge()
                             .Name("dmdserve_queue_capacity_images")
                             .Help("Images the model's batch queue holds before rejecting.")
                             .Register(*registry_);
  auto& in_flight = prometheus::BuildGauge()
                        .Name("dmdserve_requests_in_flight")
                        .Help("Generate requests accepted and not yet finished.")
                        .Register(*registry_);
  auto& ready = prometheus::BuildGauge()
                    .Name("dmdserve_model_ready")
                    .Help("1 when the model is loaded and warmed up, else 0.")
                    .Register(*registry_);
  auto& max_batch = prometheus::BuildGauge()
                        .Name("dmdserve_max_batch_size_images")
                        .Help("Largest batch the model's workers on the device take (measured "
                              "at warm-up unless --max_batch_size is set); 0 before warm-up.")
                        .Register(*registry_);
  for (const std::string& name : models) {
    // "_unknown" only counts failed requests: it has no queue, nothing in flight, no readiness.
    if (name == kUnknownModel) continue;
    PerModel& pm = models_.at(name);
    pm.queue_depth = &queue_depth.Add({{"model", name}});
    queue_capacity.Add({{"model", name}}).Set(queue_capacity_images);
    pm.in_flight = &in_flight.Add({{"model", name}});
    pm.ready = &ready.Add({{"model", name}});
    for (const std::string& device : devices) {
      pm.max_batch_size[device] = &max_batch.Add({{"model", name}, {"device", device}});
    }
  }
}

void Metrics::AddDeviceMetrics(const std::vector<std::string>& devices) {
  auto& device_busy =
      prometheus::BuildCounter()
          .Name("dmdserve_device_busy_seconds_total")
          .Help("Time during which at least one batch ran on the device; rate() is its busy ratio.")
          .Register(*registry_);
  auto& memory_used = prometheus::BuildGauge()
                          .Name("dmdserve_gpu_memory_used_bytes")
                          .Help("GPU memory in use on the device, all processes counted.")
                          .Register(*registry_);
  auto& memory_total = prometheus::BuildGauge()
                           .Name("dmdserve_gpu_memory_total_bytes")
                           .Help("GPU memory of the device.")
                           .Register(*registry_);
  for (const std::string& device : devices) {
    PerDevice pd;
    pd.busy = &device_busy.Add({{"device", device}});
    const absl::StatusOr<DeviceId> id = ParseDevice(device);
    if (id.ok() && id->cuda) {
      pd.memory_used = &memory_used.Add({{"device", device}});
      pd.memory_total = &memory_total.Add({{"device", device}});
    }
    devices_.emplace(device, pd);
  }
}

void Metrics::AddBuildInfo(const std::string& version) {
  prometheus::BuildGauge()
      .Name("dmdserve_build_info")
      .Help("Build information; the value is always 1.")
      .Register(*registry_)
      .Add({{"version", version}})
      .Set(1);
}

Metrics::PerModel& Metrics::For(std::string_view model) {
  auto it = models_.find(model);
  if (it == models_.end()) it = models_.find(kUnknownModel);
  return it->second;
}

void Metrics::RecordRequest(RpcMethod method, std::string_view model, grpc::StatusCode code,
                            absl::Duration duration, int images) {
  PerModel& pm = For(model);
  pm.requests[static_cast<int>(method)][CodeIndex(code)]->Increment();
  if (code == grpc::StatusCode::OK) {
    pm.request_duration[static_cast<int>(method)]->Observe(absl::ToDoubleSeconds(duration));
    if (images > 0) pm.images->Increment(images);
  }
}

void Metrics::RecordKeyRequest(std::string_view key, grpc::StatusCode code, int images) {
  absl::MutexLock lock(&key_mu_);
  if (key_requests_ == nullptr) {
    key_requests_ = &prometheus::BuildCounter()
                         .Name("dmdserve_api_key_requests_total")
                         .Help("RPCs finished, by API key name and gRPC status code.")
                         .Register(*registry_);
    key_images_ = &prometheus::BuildCounter()
                       .Name("dmdserve_api_key_images_total")
                       .Help("Images returned to clients, by API key name.")
                       .Register(*registry_);
  }
  const std::string name(key);
  key_requests_->Add({{"key", name}, {"code", std::string(GrpcCodeName(code))}}).Increment();
  prometheus::Counter& generated = key_images_->Add({{"key", name}});
  if (code == grpc::StatusCode::OK && images > 0) generated.Increment(images);
}

void Metrics::RecordQueueWait(std::string_view model, absl::Duration wait) {
  For(model).queue_wait->Observe(absl::ToDoubleSeconds(wait));
}

void Metrics::AddInFlight(std::string_view model, int delta) {
  if (prometheus::Gauge* g = For(model).in_flight) g->Increment(delta);
}

void Metrics::OnBatchDone(const BatchStats& stats) {
  PerModel& pm = For(stats.model);
  (stats.ok ? pm.batches_ok : pm.batches_error)->Increment();
  if (!stats.ok) return;
  pm.batch_size->Observe(stats.images);
  pm.batch_duration->Observe(absl::ToDoubleSeconds(stats.total));
  if (stats.cuda_graph) return;  // one graph replay: no stage times
  pm.text_encoder->Observe(absl::ToDoubleSeconds(stats.text_encoder));
  pm.generator->Observe(absl::ToDoubleSeconds(stats.generator));
  pm.decoder->Observe(absl::ToDoubleSeconds(stats.decoder));
}

void Metrics::OnDeviceStats(const DeviceStats& stats) {
  const auto it = devices_.find(stats.device);
  if (it == devices_.end()) return;
  const PerDevice& pd = it->second;
  pd.busy->Increment(absl::ToDoubleSeconds(stats.busy));
  if (pd.memory_used != nullptr && stats.memory_used_bytes >= 0) {
    pd.memory_used->Set(static_cast<double>(stats.memory_used_bytes));
    pd.memory_total->Set(static_cast<double>(stats.memory_total_bytes));
  }
}

void Metrics::OnImageEncoded(std::string_view model, absl::Duration encode_time) {
  For(model).png_encode->Observe(absl::ToDoubleSeconds(encode_time));
}

void Metrics::OnQueueDepth(std::string_view model, int queued_images) {
  if (prometheus::Gauge* g = For(model).queue_depth) g->Set(queued_images);
}

void Metrics::OnBatchSizeChosen(std::string_view model, std::string_view device,
                                int max_batch_size) {
  const PerModel& pm = For(model);
  const auto it = pm.max_batch_size.find(device);
  if (it != pm.max_batch_size.end()) it->second->Set(max_batch_size);
}

void Metrics::OnModelReady(std::string_view model, bool ready) {
  if (prometheus::Gauge* g = For(model).ready) g->Set(ready ? 1 : 0);
}

}  // namespace dmdserve
