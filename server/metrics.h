// Metrics: every Prometheus metric of dmdserve, defined in one place.
//
// Label children are created once in Create() for every served model (plus "_unknown" for requests
// naming no served model), every RPC method and every gRPC code, so recording never allocates or
// registers. Implements EngineListener to receive batch/encode/queue events from worker/.
// Thread-safe (prometheus-cpp metrics are atomic; lookup tables are immutable after Create()).
//
// Metric list (all durations in seconds):
//   dmdserve_requests_total{model,method,code}             counter (HTTP requests too: method
//                                                          "POST /v1/images/generations",
//                                                          "GET /v1/models", "POST /v1/generate",
//                                                          "POST /v1/generate:stream",
//                                                          "POST /v1/models:list" or
//                                                          "POST /v1/tokenize", code the status's
//                                                          canonical code)
//   dmdserve_images_generated_total{model}                 counter
//   dmdserve_request_duration_seconds{model,method}        histogram (accepted -> finished, OK
//                                                          only)
//   dmdserve_queue_wait_seconds{model}                     histogram
//   dmdserve_stage_duration_seconds{model,stage}           histogram, stage = text_encoder |
//                                                          generator | decoder (per eager batch;
//                                                          CUDA-graph replays have no stages) |
//                                                          png_encode (per image)
//   dmdserve_batch_duration_seconds{model}                 histogram (whole pipeline run per batch)
//   dmdserve_batch_size_images{model}                      histogram (real images per batch)
//   dmdserve_batches_total{model,result}                   counter, result = ok | error
//   dmdserve_queue_depth_images{model}                     gauge
//   dmdserve_queue_capacity_images{model}                  gauge (--max_queue_images)
//   dmdserve_requests_in_flight{model}                     gauge
//   dmdserve_model_ready{model}                            gauge (1 ready, 0 not)
//   dmdserve_max_batch_size_images{model,device}           gauge: largest batch the model's
//                                                          workers on the device take (measured
//                                                          at warm-up or --max_batch_size); 0
//                                                          until warm-up chose it
//   dmdserve_build_info{version}                           gauge (always 1)
//   dmdserve_api_key_requests_total{key,code}              counter, with --api_keys_file only: key
//                                                          = the key's name, or
//                                                          "_unauthenticated" (bounded by the
//                                                          keys file; children made on first use)
//   dmdserve_api_key_images_total{key}                     counter, likewise
//   dmdserve_device_busy_seconds_total{device}             counter: time at least one batch ran
//                                                          on the device; its rate() is the
//                                                          device's busy ratio (0..1)
//   dmdserve_gpu_memory_used_bytes{device}                 gauge, CUDA devices only: device-wide
//   dmdserve_gpu_memory_total_bytes{device}                gauge, CUDA devices only
// Device label values are the engine's devices ("cpu", "cuda:0", ...).
#ifndef DMDSERVE_SERVER_METRICS_H_
#define DMDSERVE_SERVER_METRICS_H_

#include <grpcpp/support/status.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker/engine.h"

namespace dmdserve {

// The API's methods: the gRPC RPCs, then the HTTP API's routes (server/http_server.h).
enum class RpcMethod {
  kGenerate = 0,
  kGenerateStream,
  kListModels,
  kTokenize,
  kHttpImagesGenerations,
  kHttpListModels,
  // The native API as JSON (one route per RPC).
  kHttpGenerate,
  kHttpGenerateStream,
  kHttpNativeListModels,
  kHttpTokenize
};
inline constexpr int kNumRpcMethods = 10;
inline constexpr int kNumGrpcCodes = 17;

class Metrics final : public EngineListener {
 public:
  struct Options {
    // Served model names (label values). At least one.
    std::vector<std::string> models;
    // Queue capacity of each model, in images (dmdserve_queue_capacity_images).
    int queue_capacity_images = 0;
    // Reported by dmdserve_build_info.
    std::string version;
    // The engine's devices (Engine::Devices()); "cuda:N" ones also get GPU memory gauges.
    std::vector<std::string> devices;
  };
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const Options& options);

  // The registry to expose (shared with the /metrics endpoint, server/metrics_http.h).
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // One finished RPC. `model` may be any string; unknown names are counted as "_unknown".
  void RecordRequest(RpcMethod method, std::string_view model, grpc::StatusCode code,
                     absl::Duration duration, int images);
  void RecordQueueWait(std::string_view model, absl::Duration wait);
  // One finished RPC of API key `key` (a name from the keys file, or "_unauthenticated").
  void RecordKeyRequest(std::string_view key, grpc::StatusCode code, int images);
  void AddInFlight(std::string_view model, int delta);

  // EngineListener.
  void OnBatchDone(const BatchStats& stats) override;
  void OnImageEncoded(std::string_view model, absl::Duration encode_time) override;
  void OnQueueDepth(std::string_view model, int queued_images) override;
  void OnModelReady(std::string_view model, bool ready) override;
  void OnDeviceStats(const DeviceStats& stats) override;
  void OnBatchSizeChosen(std::string_view model, std::string_view device,
                         int max_batch_size) override;

 private:
  struct PerModel {
    std::array<std::array<prometheus::Counter*, kNumGrpcCodes>, kNumRpcMethods> requests;
    std::array<prometheus::Histogram*, kNumRpcMethods> request_duration;
    prometheus::Counter* images;
    prometheus::Histogram* queue_wait;
    prometheus::Histogram* text_encoder;
    prometheus::Histogram* generator;
    prometheus::Histogram* decoder;
    prometheus::Histogram* png_encode;
    prometheus::Histogram* batch_duration;
    prometheus::Histogram* batch_size;
    prometheus::Counter* batches_ok;
    prometheus::Counter* batches_error;
    prometheus::Gauge* queue_depth = nullptr;  // null for "_unknown"
    prometheus::Gauge* in_flight = nullptr;
    prometheus::Gauge* ready = nullptr;
    std::map<std::string, prometheus::Gauge*, std::less<>> max_batch_size;  // by device
  };

  struct PerDevice {
    prometheus::Counter* busy = nullptr;
    prometheus::Gauge* memory_used = nullptr;  // null for the CPU
    prometheus::Gauge* memory_total = nullptr;
  };

  Metrics() = default;
  PerModel& For(std::string_view model);

  // Create()'s steps, one per group of metric families: each registers its families in
  // registry_ and adds their label children for `models` (entries of models_; "_unknown" gets no
  // queue, in-flight or readiness gauges) or `devices` (added to devices_).
  void AddRequestMetrics(const std::vector<std::string>& models);
  void AddBatchMetrics(const std::vector<std::string>& models);
  void AddModelStateMetrics(const std::vector<std::string>& models, int queue_capacity_images,
                            const std::vector<std::string>& devices);
  void AddDeviceMetrics(const std::vector<std::string>& devices);
  void AddBuildInfo(const std::string& version);

  std::shared_ptr<prometheus::Registry> registry_;
  std::map<std::string, PerModel, std::less<>> models_;    // immutable after Create()
  std::map<std::string, PerDevice, std::less<>> devices_;  // immutable after Create()
  // The API-key families, registered on the first RecordKeyRequest (only servers with API keys
  // have them).
  absl::Mutex key_mu_;
  prometheus::Family<prometheus::Counter>* key_requests_ ABSL_GUARDED_BY(key_mu_) = nullptr;
  prometheus::Family<prometheus::Counter>* key_images_ ABSL_GUARDED_BY(key_mu_) = nullptr;
};

// Label value of a method ("Generate", ...; the HTTP routes as their method and path, e.g.
// "POST /v1/images/generations", "GET /v1/models", "POST /v1/generate").
std::string_view RpcMethodName(RpcMethod method);

// Label value of a gRPC code ("OK", "INVALID_ARGUMENT", ...); "UNKNOWN" for codes out of range.
std::string_view GrpcCodeName(grpc::StatusCode code);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_METRICS_H_
