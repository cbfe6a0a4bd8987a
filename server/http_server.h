// HttpApiServer: the HTTP/1.1 API on its own port, a thin adapter beside the gRPC service: the
// same backend (generation_backend.h), validation (request_validation.h), API keys (api_keys.h),
// metrics (own method labels) and drain. It routes (http_routes.h) and moves bytes; the JSON is
// openai_api.h's and native_json.h's, the playground's files static_assets.h's.
//
// Routes:
//   POST /v1/images/generations   OpenAI's image generation (openai_api.h)
//   GET  /v1/models               the served models in OpenAI's list shape
//   POST /v1/generate             Generate: GenerateRequest JSON -> GenerateResponse JSON
//   POST /v1/generate:stream      GenerateStream: GenerateRequest JSON -> one GeneratedImage JSON
//                                 per line (application/x-ndjson, chunked), each image sent when
//                                 it is ready (http_stream.h); an error before the first image
//                                 is an ordinary error response, one after it a last line
//                                 {"error": {...}} (the status stays 200)
//   POST /v1/models:list          ListModels: ListModelsRequest JSON (or no body) -> response JSON
//   POST /v1/tokenize             Tokenize: TokenizeRequest JSON -> TokenizeResponse JSON
//   GET  /, /playground/NAME      the playground page (static_assets.h): no API key, not counted
//   another method on these: 405 (with Allow); another path: 404.
// Errors are openai_api.h's {"error": {...}} (ToHttpError), with `status` on the native routes.
// Headers read: `Authorization: Bearer KEY` (with API keys, every API route needs one: 401
// without), `X-Request-Timeout: SECONDS` (decimal > 0: the request's deadline, like a gRPC
// deadline; 504 when it passes before the request ran; absent: none), `X-Request-Id` (logged,
// <= 128 printable ASCII bytes; on the native generate routes the body's request_id wins). A
// 429 carries `Retry-After: 1`.
//
// Why libmicrohttpd (as for /metrics, metrics_http.h): its internal thread is event-driven
// (epoll), so a client that connects and stalls (half a request, or never reads its response)
// holds one connection slot and nothing else; every connection is dropped after io_timeout of
// silence; connections are capped in all and per IP address. A generation never blocks that
// thread: once its body is read and checked, the connection is suspended
// (MHD_suspend_connection) and the backend's on_done builds the response and resumes it (a
// stream's connection likewise waits, suspended, for each next image). A suspended connection
// has no I/O timeout (generation may take long; its deadline is the request's own), and a client
// that goes away meanwhile is noticed only when the response is sent (the images are computed
// anyway; a stream's later images are dropped before compute once its client is gone).
// The alternatives in Debian 12: cpp-httplib 0.11 serves each connection on a pool thread, so a
// few stalled or keep-alive clients occupy the pool and a generation would hold a thread for its
// whole run (no suspension); Boost.Beast 1.74 is asynchronous and robust but a toolkit, leaving
// the server itself (timeouts, limits, connection management) to be written here.
//
// Bodies: a Content-Length over max_body_bytes is answered 413 without reading the body; a body
// without Content-Length (chunked) that grows past it has its connection closed.
//
// HTTPS: with Options.tls enabled, the port speaks TLS 1.2/1.3 only, with the gRPC port's
// certificate files, re-read while serving (https_credentials.h); with a client CA, every
// request must come over a connection whose client certificate that CA signed (401 otherwise).
//
// Drain: StartDrain() makes every new API request get 503 (`Connection: close`) while accepted
// ones finish (streams included); WaitIdle() returns once every accepted request has been
// answered and sent. The playground's files are still served while draining.
// Thread-safe. Does not own the backend, metrics or keys, which must outlive it; the backend must
// deliver every accepted request's on_done before the server is destroyed (DmdServer drains the
// engine first).
#ifndef DMDSERVE_SERVER_HTTP_SERVER_H_
#define DMDSERVE_SERVER_HTTP_SERVER_H_

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "google/protobuf/message.h"
#include "server/api_keys.h"
#include "server/generation_backend.h"
#include "server/https_credentials.h"
#include "server/http_stream.h"
#include "server/metrics.h"
#include "server/openai_api.h"
#include "server/request_validation.h"

struct MHD_Connection;  // <microhttpd.h>
struct MHD_Daemon;

namespace dmdserve {

class HttpApiServer {
 public:
  struct Options {
    // Address to listen on (numeric or a host name). Default all IPv4 interfaces.
    std::string host = "0.0.0.0";
    // TCP port; 0 picks a free port (see port()). Default 8080.
    int port = 8080;
    // Longest a client may stay silent while sending its request or taking its response, rounded
    // up to whole seconds. Default 30 s.
    absl::Duration io_timeout = absl::Seconds(30);
    // Largest request body, in bytes. Default 64 KiB (a prompt is at most 4 KiB by default).
    int max_body_bytes = 64 << 10;
    // Connections open at once, in all and from one IP address (more are closed when accepted).
    int max_connections = 256;
    int max_connections_per_ip = 64;
    // Model aliases applied to a request's `model` before resolution.
    ModelAliases model_aliases;
    RequestLimits limits;
    // TLS, as for the gRPC port (tls.h). Default disabled: plaintext HTTP.
    TlsOptions tls;
  };

  // Binds and starts serving. UNAVAILABLE naming host:port when it cannot bind; INVALID_ARGUMENT
  // for bad options; INTERNAL when libmicrohttpd cannot start. `keys` may be null (no keys).
  static absl::StatusOr<std::unique_ptr<HttpApiServer>> Create(Options options,
                                                               GenerationBackend* backend,
                                                               Metrics* metrics, ApiKeys* keys);
  // Stops the daemon, closing open connections. Call after WaitIdle() for a clean drain.
  ~HttpApiServer();

  HttpApiServer(const HttpApiServer&) = delete;
  HttpApiServer& operator=(const HttpApiServer&) = delete;

  int port() const { return port_; }
  bool https() const { return https_ != nullptr; }

  // From now on every new request is answered 503.
  void StartDrain() { draining_.store(true); }
  // Waits until no accepted request is unanswered or unsent, at most `timeout`; false on timeout.
  bool WaitIdle(absl::Duration timeout);

  // Internal (libmicrohttpd's callbacks, in http_server.cc).
  struct Call;
  int HandleRequest(MHD_Connection* connection, const char* url, const char* method,
                    const char* upload_data, size_t* upload_data_size, void** request_state);
  // `completed`: the response was sent in full.
  void RequestCompleted(void** request_state, bool completed);

 private:
  HttpApiServer(Options options, GenerationBackend* backend, Metrics* metrics, ApiKeys* keys)
      : options_(std::move(options)), backend_(backend), metrics_(metrics), keys_(keys),
        created_(absl::Now()) {}

  // The first call for a request (headers in): routes it, serves a static file, or refuses it
  // early when it can (404, 405, 503 draining, 401, 413); -1 when it goes on to read the body.
  int Admit(MHD_Connection* connection, const char* url, const char* method, Call& call);
  // Admit's checks once the route is known (drain, API key, body size); -1 to go on.
  int AdmitApiCall(MHD_Connection* connection, Call& call);
  // The last call (body in): answers the call, or starts a generation.
  int Dispatch(MHD_Connection* connection, const std::shared_ptr<Call>& call);
  // POST /v1/models:list and POST /v1/tokenize: answered at once.
  void ListModels(Call& call);
  void Tokenize(Call& call);
  // Answers at once (false) or suspends the connection until on_done answers (true).
  bool StartGeneration(MHD_Connection* connection, const std::shared_ptr<Call>& call);
  // POST /v1/generate:stream: queues the answer, or suspends until the first image or the end.
  int StartStream(MHD_Connection* connection, const std::shared_ptr<Call>& call);
  // Queues a stream's response once its first event came: 200 and the lines, or its error.
  int QueueStream(MHD_Connection* connection, Call& call);
  // The generate request of an image-generation route (OpenAI's or native JSON), with the
  // request id.
  absl::StatusOr<v1::GenerateRequest> ParseGenerateRequest(MHD_Connection* connection,
                                                           Call& call) const;
  // The request as GenerateParams: parsed, timed, validated, model resolved, and admitted by its
  // API key's rate limit (when the server has keys).
  absl::StatusOr<GenerateParams> Prepare(MHD_Connection* connection, Call& call) const;
  // The success body of a finished generation, in the route's JSON.
  absl::StatusOr<std::string> GenerationBody(const Call& call, GenerateResult result) const;
  // Stores the answer (`body` when `status` is OK, else its error, or `error` when given) and
  // logs and counts the request. Returns whether the connection was suspended (the caller must
  // then resume it); the caller otherwise queues the answer.
  bool Answer(Call& call, const absl::Status& status, std::string body, int images,
              const HttpError* error = nullptr);
  // Answer() with `message` as native JSON (INTERNAL if it cannot be printed).
  bool AnswerJson(Call& call, const google::protobuf::Message& message);
  // Counts and logs a finished request.
  void Record(const Call& call, const absl::Status& status, int http_status, int images);

  const Options options_;
  GenerationBackend* const backend_;
  Metrics* const metrics_;
  ApiKeys* const keys_;
  const absl::Time created_;  // reported as the models' `created`
  std::atomic<bool> draining_{false};
  absl::Mutex mu_;
  int open_calls_ ABSL_GUARDED_BY(mu_) = 0;  // created and not yet completed
  std::unique_ptr<HttpsCredentials> https_;  // null for plaintext; outlives daemon_
  MHD_Daemon* daemon_ = nullptr;
  int port_ = 0;
};

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_HTTP_SERVER_H_
