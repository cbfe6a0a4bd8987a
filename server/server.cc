#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/image_service.h"
#include "server/metrics.h"
#include "spdlog/spdlog.h"

namespace dmdserve {
namespace {

constexpr char kServiceName[] = "dmdserve.v1.ImageGeneration";

void SetHealth(grpc::Server* server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus("", serving);
  health->SetServingStatus(kServiceName, serving);
}

// Removes the reflection plugin from a ServerBuilder. Linking grpc++_reflection registers the
// plugin for every builder in a static initializer, so leaving out the Init call is not enough.
class WithoutReflection : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [](const std::unique_ptr<grpc::ServerBuilderPlugin>& plugin) {
                                    return plugin->name() == "proto_server_reflection";
                                  }),
                   plugins->end());
  }
};

// The builder's settings that do not depend on the service: reflection on or off, message and
// metadata limits, and an exclusive port (gRPC sets SO_REUSEPORT by default, which would let a second
// server on the same port start and take part of the connections).
void ConfigureBuilder(const DmdServer::Options& options, grpc::ServerBuilder& builder) {
  if (options.reflection) {
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  } else {
    builder.SetOption(std::make_unique<WithoutReflection>());
  }
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddChannelArgument(GRPC_ARG_MAX_METADATA_SIZE, DmdServer::kMaxMetadataBytes);
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  builder.SetMaxSendMessageSize(options.max_send_message_bytes);
}

// Says so at start-up when the gRPC port is reachable from other machines in plaintext.
void WarnIfExposed(const DmdServer::Options& options) {
  if (options.tls.enabled()) {
    spdlog::info("{}: TLS{} (certificate files re-read every {}s)",
                 options.http_port >= 0 ? "gRPC and HTTP ports" : "gRPC port",
                 options.tls.client_ca_file.empty() ? "" : " with client certificates (mTLS)",
                 options.tls.refresh_s);
  } else if (!IsLoopbackHost(options.listen_host)) {
    spdlog::warn(
        "listening on {} without TLS: requests, prompts and images cross the network in "
        "plaintext; set --tls_cert_file and --tls_key_file, or --listen_host=127.0.0.1 behind a "
        "TLS-terminating proxy",
        options.listen_host);
  }
  if (options.api_keys_file.empty() && !IsLoopbackHost(options.listen_host)) {
    spdlog::warn("listening on {} without API keys: anyone who reaches the port can generate "
                 "images; set --api_keys_file",
                 options.listen_host);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<DmdServer>> DmdServer::Create(Options options) {
  std::unique_ptr<DmdServer> s(new DmdServer());
  s->options_ = options;

  spdlog::info("loading {} model bundle(s) on {}", options.engine.model_dirs.size(),
               absl::StrJoin(options.engine.devices, ","));
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(options.engine);
  if (!engine.ok()) return engine.status();
  s->engine_ = *std::move(engine);

  Metrics::Options metrics_options;
  metrics_options.version = options.version;
  metrics_options.queue_capacity_images = options.engine.max_queued_images;
  metrics_options.devices = s->engine_->Devices();
  for (const ModelInfo& info : s->engine_->ListModels())
    metrics_options.models.push_back(info.name);
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create(metrics_options);
  if (!metrics.ok()) return metrics.status();
  s->metrics_ = *std::move(metrics);
  s->engine_->SetListener(s->metrics_.get());

  // /metrics on its own port and thread: a scrape never waits behind the model queue.
  MetricsHttpServer::Options http_options;
  http_options.host = options.listen_host;
  http_options.port = options.metrics_port;
  http_options.render = [registry = s->metrics_->registry()] {
    return prometheus::TextSerializer().Serialize(registry->Collect());
  };
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> http =
      MetricsHttpServer::Create(std::move(http_options));
  if (!http.ok()) return http.status();
  s->metrics_http_ = *std::move(http);

  s->backend_ = std::make_unique<EngineBackend>(s->engine_.get());
  if (!options.api_keys_file.empty()) {
    absl::StatusOr<std::unique_ptr<ApiKeys>> keys = ApiKeys::Load(options.api_keys_file);
    if (!keys.ok()) return keys.status();
    s->api_keys_ = *std::move(keys);
    spdlog::info("API keys: {} key(s) from {}", s->api_keys_->size(), options.api_keys_file);
  }
  s->service_ = std::make_unique<ImageGenerationService>(s->backend_.get(), s->metrics_.get(),
                                                         options.limits, s->api_keys_.get());
  grpc::EnableDefaultHealthCheckService(true);
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      MakeServerCredentials(options.tls);
  if (!credentials.ok()) return credentials.status();
  WarnIfExposed(options);
  grpc::ServerBuilder builder;
  ConfigureBuilder(options, builder);
  const std::string address = absl::StrCat(options.listen_host, ":", options.port);
  builder.AddListeningPort(address, *credentials, &s->port_);
  builder.RegisterService(s->service_.get());
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen for gRPC on ", address,
                     " (is another process listening on that port? ports are not shared)"));
  }
  // gRPC's default health service starts as SERVING: not until the models are warm.
  SetHealth(s->server_.get(), false);
  if (absl::Status http = s->StartHttp(); !http.ok()) return http;
  spdlog::info("gRPC listening on {}:{}, /metrics on {}:{}, HTTP API on {}; warming up",
               options.listen_host, s->port_, options.listen_host, s->metrics_port(),
               s->http_ != nullptr ? absl::StrCat(options.listen_host, ":", s->http_port())
                                   : std::string("(off)"));

  if (absl::Status warm = s->engine_->Warmup(); !warm.ok()) return warm;
  SetHealth(s->server_.get(), true);
  spdlog::info("ready: serving {} model(s)", metrics_options.models.size());
  return s;
}

absl::Status DmdServer::StartHttp() {
  if (options_.http_port < 0) return absl::OkStatus();
  HttpApiServer::Options http;
  http.tls = options_.tls;
  http.host = options_.listen_host;
  http.port = options_.http_port;
  http.max_body_bytes = options_.http_max_body_bytes;
  http.model_aliases = options_.http_model_aliases;
  http.limits = options_.limits;
  absl::StatusOr<std::unique_ptr<HttpApiServer>> server =
      HttpApiServer::Create(std::move(http), backend_.get(), metrics_.get(), api_keys_.get());
  if (!server.ok()) return server.status();
  http_ = *std::move(server);
  return absl::OkStatus();
}

DmdServer::~DmdServer() { Shutdown(); }

absl::StatusOr<int> DmdServer::ReloadApiKeys() {
  if (api_keys_ == nullptr) {
    return absl::FailedPreconditionError("no --api_keys_file to reload");
  }
  return api_keys_->Reload();
}

void DmdServer::Shutdown() {
  absl::MutexLock lock(&shutdown_mu_);
  if (shut_down_) return;
  shut_down_ = true;
  // From here on new HTTP requests get 503; accepted ones finish like gRPC's.
  if (http_ != nullptr) http_->StartDrain();
  if (server_ != nullptr) {
    // NOT_SERVING first, so load balancers stop sending while accepted work finishes.
    SetHealth(server_.get(), false);
    if (auto* health = server_->GetHealthCheckService()) health->Shutdown();
    spdlog::info("draining: finishing accepted requests (grace {})",
                 absl::FormatDuration(options_.drain_grace));
  }
  // The engine first: new Generate calls get UNAVAILABLE from here on, and every accepted request
  // gets its final status (its result, or CANCELLED once the grace ends) while the transport is
  // still up to deliver it.
  if (engine_ != nullptr) engine_->Shutdown(options_.drain_grace);
  constexpr absl::Duration kFlush = absl::Seconds(5);
  if (http_ != nullptr) {
    // Every accepted HTTP request has its answer now; give the answers kFlush to go out.
    if (!http_->WaitIdle(kFlush)) {
      spdlog::warn("HTTP API: closing connections with answers unsent");
    }
    http_.reset();
  }
  if (server_ != nullptr) {
    // Refuses new RPCs and lets the finished ones send their last bytes; after kFlush it cancels
    // what is left (e.g. a stream whose client stopped reading).
    server_->Shutdown(absl::ToChronoTime(absl::Now() + kFlush));
    server_->Wait();
  }
  spdlog::info("stopped");
}

}  // namespace dmdserve
