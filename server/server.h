// DmdServer: wires the engine, the gRPC service, health, reflection, the HTTP API and the
// /metrics endpoint.
//
// Lifecycle: Create() loads every model (Engine::Create), starts gRPC, the HTTP API and /metrics
// with health NOT_SERVING (HTTP generations get 503 meanwhile), warms every model up, then
// reports SERVING. Shutdown() drains: health goes NOT_SERVING at once, new RPCs are refused (new
// HTTP requests get 503), accepted requests finish (up to the drain grace period, after which
// gRPC cancels what is left), then the engine and the threads stop.
// Thread-safe. Owns everything it creates.
#ifndef DMDSERVE_SERVER_SERVER_H_
#define DMDSERVE_SERVER_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/generation_backend.h"
#include "server/http_server.h"
#include "server/metrics_http.h"
#include "server/api_keys.h"
#include "server/request_validation.h"
#include "server/tls.h"
#include "worker/engine.h"

namespace grpc {
class Server;
}

namespace dmdserve {

class ImageGenerationService;
class Metrics;

class DmdServer {
 public:
  // Largest request metadata (all headers of a call, as gRPC counts them) accepted: 64 KiB, 8x
  // gRPC's default and above what proxies pass on by default (Envoy 60 KiB, nginx 32 KiB), so a
  // proxy that shares connections between clients refuses an oversized call itself. A call over
  // the limit fails with RESOURCE_EXHAUSTED, and gRPC 1.51's HTTP/2 transport then closes its
  // connection, failing the calls in flight on it (tests/integration/test_listener.py).
  static constexpr int kMaxMetadataBytes = 64 << 10;

  struct Options {
    // Address to listen on for gRPC and /metrics. Default all interfaces.
    std::string listen_host = "0.0.0.0";
    // TLS for the gRPC port (server/tls.h); default off (plaintext, with a warning at start-up
    // when listen_host is not a loopback address). /metrics stays plaintext.
    TlsOptions tls;
    // API keys file (server/api_keys.h): every ImageGeneration call must carry one of its keys
    // ("authorization: Bearer KEY"); health checks stay open. Empty (default): no keys.
    std::string api_keys_file;
    // gRPC port; 0 picks a free port (see port()). Default 50051.
    int port = 50051;
    // Prometheus /metrics port; 0 picks a free port (see metrics_port()). Default 9464.
    int metrics_port = 9464;
    // HTTP/JSON API port (server/http_server.h: OpenAI-compatible image generation); 0 picks a
    // free port (see http_port()), -1 turns the HTTP API off. Default 8080. With tls enabled it
    // speaks HTTPS with the same certificates (and client CA).
    int http_port = 8080;
    // Largest HTTP request body, in bytes. Default 64 KiB.
    int http_max_body_bytes = 64 << 10;
    // HTTP API model aliases (alias -> served model), e.g. gpt-image-1 -> fashion-dmd.
    ModelAliases http_model_aliases;
    // Serve grpc.reflection.v1alpha (lets grpcurl-like tools discover the API). Default on.
    bool reflection = true;
    // Largest request / response message, in bytes. Requests are small; responses carry images.
    int max_receive_message_bytes = 4 << 20;
    int max_send_message_bytes = 256 << 20;
    // How long Shutdown() lets queued requests wait to run; then those still queued finish with
    // CANCELLED and running batches with their results, all delivered to their clients (up to
    // 5 s more for the last bytes to go out). Default 30 s.
    absl::Duration drain_grace = absl::Seconds(30);
    RequestLimits limits;
    Engine::Options engine;
    // Reported in dmdserve_build_info and logs.
    std::string version;
  };

  static absl::StatusOr<std::unique_ptr<DmdServer>> Create(Options options);
  ~DmdServer();

  int port() const { return port_; }
  int metrics_port() const { return metrics_http_->port(); }
  // The HTTP API's port; -1 when it is off.
  int http_port() const { return http_ != nullptr ? http_->port() : -1; }

  // Drains and stops; see the class comment. Idempotent; returns when everything has stopped.
  void Shutdown();

  // Re-reads the API keys file (dmdserve calls it on SIGHUP): the number of keys now, or the
  // error that left the previous keys in place. FAILED_PRECONDITION without --api_keys_file.
  absl::StatusOr<int> ReloadApiKeys();

 private:
  DmdServer() = default;
  // Starts the HTTP API per options_ (or leaves it off); needs backend_, metrics_ and api_keys_.
  absl::Status StartHttp();

  Options options_;
  int port_ = 0;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<EngineBackend> backend_;  // engine_ as the service's GenerationBackend
  std::unique_ptr<ApiKeys> api_keys_;       // null without Options.api_keys_file
  std::unique_ptr<ImageGenerationService> service_;
  std::unique_ptr<HttpApiServer> http_;  // null when off
  std::unique_ptr<grpc::Server> server_;
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
};

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_SERVER_H_
