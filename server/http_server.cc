#include "server/http_server.h"

#include <microhttpd.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/counted_submit.h"
#include "server/http_routes.h"
#include "server/native_json.h"
#include "server/proto_conversion.h"
#include "server/static_assets.h"
#include "server/tcp_listen.h"
#include "spdlog/spdlog.h"

namespace dmdserve {
namespace {

constexpr char kJsonContentType[] = "application/json";
constexpr char kNdjsonContentType[] = "application/x-ndjson";
constexpr char kNoSniff[] = "nosniff";
// The daemon's one thread: the same generous stack as /metrics' (see metrics_http.h for why).
constexpr size_t kThreadStackBytes = size_t{8} << 20;
// The per-connection memory pool: request line, headers and the read buffer the body passes
// through (bodies are copied out as they arrive, so it does not bound the body).
constexpr size_t kConnectionPoolBytes = size_t{64} << 10;
// Longest a user field or a request id is logged, in bytes.
constexpr size_t kMaxLoggedBytes = 128;

thread_local bool t_starting_daemon = false;

void LogFromMhd(void* /*closure*/, const char* format, va_list args) {
  char line[512];
  std::vsnprintf(line, sizeof(line), format, args);
  absl::string_view text(line);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.remove_suffix(1);
  if (t_starting_daemon) {
    spdlog::warn("HTTP API (libmicrohttpd): {}", std::string(text));
  } else {
    spdlog::debug("HTTP API (libmicrohttpd): {}", std::string(text));
  }
}

absl::string_view Header(MHD_Connection* connection, const char* name) {
  const char* value = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, name);
  return value == nullptr ? absl::string_view() : absl::string_view(value);
}

// A client-supplied string as it may appear in a log line: escaped and cut.
std::string Loggable(absl::string_view text) {
  return absl::CHexEscape(text.substr(0, kMaxLoggedBytes));
}

// The deadline that X-Request-Timeout (decimal seconds) sets; infinite without the header.
absl::StatusOr<absl::Time> DeadlineOf(absl::string_view timeout_header) {
  if (timeout_header.empty()) return absl::InfiniteFuture();
  double seconds = 0;
  if (!absl::SimpleAtod(timeout_header, &seconds) || !std::isfinite(seconds) || seconds <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "X-Request-Timeout must be a number of seconds > 0, got '", Loggable(timeout_header), "'"));
  }
  return absl::Now() + absl::Seconds(std::min(seconds, 1e9));
}

unsigned int TimeoutSeconds(absl::Duration io_timeout) {
  const int64_t seconds = absl::ToInt64Seconds(absl::Ceil(io_timeout, absl::Seconds(1)));
  return static_cast<unsigned int>(
      std::clamp<int64_t>(seconds, 1, std::numeric_limits<unsigned int>::max()));
}

MHD_Result AccessHandler(void* closure, MHD_Connection* connection, const char* url,
                         const char* method, const char* /*version*/, const char* upload_data,
                         size_t* upload_data_size, void** request_state) {
  return static_cast<HttpApiServer*>(closure)->HandleRequest(
                 connection, url, method, upload_data, upload_data_size, request_state) != 0
             ? MHD_YES
             : MHD_NO;
}

void CompletedHandler(void* closure, MHD_Connection* /*connection*/, void** request_state,
                      MHD_RequestTerminationCode code) {
  static_cast<HttpApiServer*>(closure)->RequestCompleted(
      request_state, code == MHD_REQUEST_TERMINATED_COMPLETED_OK);
}

}  // namespace

// One HTTP request, from its headers to its completion (shared with a generation's on_done).
struct HttpApiServer::Call {
  const HttpRoute* route = nullptr;  // set by Admit for every call that goes on
  absl::Time started;
  std::string key;  // the API key's name ("" without keys)
  std::string body;
  std::string model;
  std::string request_id;
  std::string user;
  std::shared_ptr<HttpStream> stream;  // POST /v1/generate:stream, once submitted
  std::optional<StaticAsset> asset;    // a playground file (no route, not counted)

  absl::Mutex mu;
  bool answered ABSL_GUARDED_BY(mu) = false;
  bool suspended ABSL_GUARDED_BY(mu) = false;  // waiting for on_done's MHD_resume_connection
  int http_status ABSL_GUARDED_BY(mu) = 500;
  std::string response ABSL_GUARDED_BY(mu);
  bool retry_after ABSL_GUARDED_BY(mu) = false;
};

namespace {

// `status` tagged with the request field it is about, in the route's names (OpenAI's for
// /v1/images/generations, the proto's for the native routes).
absl::Status WithParam(const HttpApiServer::Call& call, absl::Status status) {
  switch (call.route->call) {
    case HttpCall::kImagesGenerations:
      return WithOpenAiParam(std::move(status));
    case HttpCall::kGenerate:
    case HttpCall::kGenerateStream:
      return WithFieldParam(std::move(status), *v1::GenerateRequest::descriptor());
    case HttpCall::kTokenize:
      return WithFieldParam(std::move(status), *v1::TokenizeRequest::descriptor());
    case HttpCall::kOpenAiModels:
    case HttpCall::kListModels:
      break;
  }
  return status;
}

// Queues `call`'s answer (application/json; `Connection: close` while draining).
int QueueAnswer(MHD_Connection* connection, HttpApiServer::Call& call, bool draining) {
  absl::MutexLock lock(&call.mu);
  MHD_Response* response = MHD_create_response_from_buffer(
      call.response.size(), call.response.data(), MHD_RESPMEM_MUST_COPY);
  if (response == nullptr) return MHD_NO;  // out of memory: libmicrohttpd closes the connection
  MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, kJsonContentType);
  MHD_add_response_header(response, MHD_HTTP_HEADER_X_CONTENT_TYPE_OPTIONS, kNoSniff);
  if (call.retry_after) MHD_add_response_header(response, MHD_HTTP_HEADER_RETRY_AFTER, "1");
  if (draining) MHD_add_response_header(response, MHD_HTTP_HEADER_CONNECTION, "close");
  const MHD_Result queued =
      MHD_queue_response(connection, static_cast<unsigned int>(call.http_status), response);
  MHD_destroy_response(response);
  return queued;
}

// An error that is not a request's (unknown path, wrong method): not counted or logged.
int RespondError(MHD_Connection* connection, const HttpError& error, const char* allow) {
  MHD_Response* response = MHD_create_response_from_buffer(
      error.body.size(), const_cast<char*>(error.body.data()), MHD_RESPMEM_MUST_COPY);
  if (response == nullptr) return MHD_NO;
  MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, kJsonContentType);
  MHD_add_response_header(response, MHD_HTTP_HEADER_X_CONTENT_TYPE_OPTIONS, kNoSniff);
  if (allow != nullptr) MHD_add_response_header(response, MHD_HTTP_HEADER_ALLOW, allow);
  const MHD_Result queued =
      MHD_queue_response(connection, static_cast<unsigned int>(error.http_status), response);
  MHD_destroy_response(response);
  return queued;
}

// libmicrohttpd's TLS options for `https`: its certificates through GnuTLS's callback, TLS 1.2 and
// 1.3 only, and with a client CA, a certificate request naming it.
std::vector<MHD_OptionItem> TlsDaemonOptions(const HttpsCredentials& https) {
  std::vector<MHD_OptionItem> items = {
      {MHD_OPTION_HTTPS_CERT_CALLBACK, 0,
       reinterpret_cast<void*>(&HttpsCredentials::RetrieveCertificate)},
      {MHD_OPTION_HTTPS_PRIORITIES, 0,
       const_cast<char*>("NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2")},
  };
  if (https.requires_client_certificate()) {
    items.push_back(
        {MHD_OPTION_HTTPS_MEM_TRUST, 0, const_cast<char*>(https.client_ca_pem().c_str())});
  }
  return items;
}

// The connection's GnuTLS session; null on a plaintext connection.
gnutls_session_t TlsSession(MHD_Connection* connection) {
  const MHD_ConnectionInfo* info =
      MHD_get_connection_info(connection, MHD_CONNECTION_INFO_GNUTLS_SESSION);
  return info == nullptr ? nullptr : static_cast<gnutls_session_t>(info->tls_session);
}

// A playground file: no key needed (it holds no secret), not counted or logged.
int RespondStatic(MHD_Connection* connection, const StaticAsset& asset, bool draining) {
  // The bytes are static: no copy.
  MHD_Response* response = MHD_create_response_from_buffer(
      asset.body.size(), const_cast<char*>(asset.body.data()), MHD_RESPMEM_PERSISTENT);
  if (response == nullptr) return MHD_NO;
  MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE,
                          std::string(asset.content_type).c_str());
  MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_SECURITY_POLICY, kPlaygroundCsp);
  MHD_add_response_header(response, MHD_HTTP_HEADER_X_CONTENT_TYPE_OPTIONS, kNoSniff);
  MHD_add_response_header(response, "Referrer-Policy", "no-referrer");
  MHD_add_response_header(response, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
  if (draining) MHD_add_response_header(response, MHD_HTTP_HEADER_CONNECTION, "close");
  const MHD_Result queued = MHD_queue_response(connection, MHD_HTTP_OK, response);
  MHD_destroy_response(response);
  return queued;
}

}  // namespace

absl::StatusOr<std::unique_ptr<HttpApiServer>> HttpApiServer::Create(Options options,
                                                                     GenerationBackend* backend,
                                                                     Metrics* metrics,
                                                                     ApiKeys* keys) {
  if (backend == nullptr || metrics == nullptr) {
    return absl::InvalidArgumentError("HttpApiServer: backend and metrics are required");
  }
  if (options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTP port must be in [0, 65535], got ", options.port));
  }
  if (options.io_timeout <= absl::ZeroDuration() || options.max_body_bytes < 1 ||
      options.max_connections < 1 || options.max_connections_per_ip < 1) {
    return absl::InvalidArgumentError(
        "HttpApiServer: io_timeout, max_body_bytes and the connection limits must be > 0");
  }
  int port = 0;
  absl::StatusOr<int> fd = ListenTcp(options.host, options.port, "the HTTP API", port);
  if (!fd.ok()) return fd.status();
  std::unique_ptr<HttpApiServer> server(
      new HttpApiServer(std::move(options), backend, metrics, keys));
  server->port_ = port;
  const Options& o = server->options_;
  unsigned int flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
  std::vector<MHD_OptionItem> tls_options;
  if (o.tls.enabled()) {
    absl::StatusOr<std::unique_ptr<HttpsCredentials>> https = HttpsCredentials::Create(o.tls);
    if (!https.ok()) return https.status();
    server->https_ = *std::move(https);
    flags |= MHD_USE_TLS;
    tls_options = TlsDaemonOptions(*server->https_);
  }
  tls_options.push_back({MHD_OPTION_END, 0, nullptr});
  t_starting_daemon = true;
  // clang-format off
  server->daemon_ = MHD_start_daemon(
      flags, /*port=*/0, /*apc=*/nullptr, /*apc_cls=*/nullptr, &AccessHandler, server.get(),
      MHD_OPTION_EXTERNAL_LOGGER, &LogFromMhd, nullptr,  // first, or MHD warns at start
      MHD_OPTION_NOTIFY_COMPLETED, &CompletedHandler, server.get(),
      MHD_OPTION_LISTEN_SOCKET, static_cast<MHD_socket>(*fd),
      MHD_OPTION_THREAD_STACK_SIZE, kThreadStackBytes,
      MHD_OPTION_CONNECTION_TIMEOUT, TimeoutSeconds(o.io_timeout),
      MHD_OPTION_CONNECTION_LIMIT, static_cast<unsigned int>(o.max_connections),
      MHD_OPTION_PER_IP_CONNECTION_LIMIT, static_cast<unsigned int>(o.max_connections_per_ip),
      MHD_OPTION_CONNECTION_MEMORY_LIMIT, kConnectionPoolBytes,
      MHD_OPTION_ARRAY, tls_options.data(),
      MHD_OPTION_END);
  // clang-format on
  t_starting_daemon = false;
  if (server->daemon_ == nullptr) {
    // As in metrics_http.cc: `fd` is left open rather than risking a double close.
    return absl::InternalError(absl::StrCat("cannot start the HTTP API on ", o.host, ":", port,
                                            " (libmicrohttpd; its reason is logged above)"));
  }
  return server;
}

HttpApiServer::~HttpApiServer() {
  if (daemon_ != nullptr) MHD_stop_daemon(daemon_);
}

bool HttpApiServer::WaitIdle(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(
      absl::Condition(
          +[](int* open) { return *open == 0; }, &open_calls_),
      timeout);
}

void HttpApiServer::RequestCompleted(void** request_state, bool completed) {
  auto* holder = static_cast<std::shared_ptr<Call>*>(*request_state);
  if (holder == nullptr) return;
  if (const std::shared_ptr<HttpStream>& stream = (*holder)->stream; stream != nullptr) {
    if (std::optional<HttpStream::Outcome> outcome = stream->ConnectionDone(completed)) {
      Record(**holder, outcome->status, MHD_HTTP_OK, outcome->status.ok() ? outcome->lines : 0);
    }
  }
  delete holder;
  *request_state = nullptr;
  absl::MutexLock lock(&mu_);
  --open_calls_;
}

int HttpApiServer::HandleRequest(MHD_Connection* connection, const char* url, const char* method,
                                 const char* upload_data, size_t* upload_data_size,
                                 void** request_state) {
  auto* holder = static_cast<std::shared_ptr<Call>*>(*request_state);
  if (holder == nullptr) {  // the headers are in
    holder = new std::shared_ptr<Call>(std::make_shared<Call>());
    *request_state = holder;
    {
      absl::MutexLock lock(&mu_);
      ++open_calls_;
    }
    const int early = Admit(connection, url, method, **holder);
    return early >= 0 ? early : MHD_YES;
  }
  Call& call = **holder;
  if (*upload_data_size > 0) {  // a piece of the body
    if (call.body.size() + *upload_data_size > static_cast<size_t>(options_.max_body_bytes)) {
      return MHD_NO;  // no Content-Length, and over the limit: close the connection
    }
    call.body.append(upload_data, *upload_data_size);
    *upload_data_size = 0;
    return MHD_YES;
  }
  bool answered = false;
  {
    absl::MutexLock lock(&call.mu);
    answered = call.answered;
  }
  if (call.asset.has_value()) return RespondStatic(connection, *call.asset, draining_.load());
  if (answered) return QueueAnswer(connection, call, draining_.load());  // resumed
  if (call.stream != nullptr) return QueueStream(connection, call);      // resumed
  return Dispatch(connection, *holder);
}

int HttpApiServer::Admit(MHD_Connection* connection, const char* url, const char* method,
                         Call& call) {
  call.started = absl::Now();
  if (https_ != nullptr) {
    if (absl::Status s = https_->VerifyClient(TlsSession(connection)); !s.ok()) {
      return RespondError(connection, ToHttpError(s), nullptr);
    }
  }
  const absl::string_view path(url);
  const absl::string_view verb(method);
  if (std::optional<StaticAsset> asset =
          FindStaticAsset(std::string_view(path.data(), path.size()));
      asset.has_value()) {
    if (verb != MHD_HTTP_METHOD_GET && verb != MHD_HTTP_METHOD_HEAD) {
      return RespondError(
          connection, MakeHttpError(405, "invalid_request_error", "method_not_allowed", "use GET"),
          "GET, HEAD");
    }
    // Answered once the request is read in full: an answer queued now would close the
    // connection (libmicrohttpd cannot tell whether a body follows), and a page loads several.
    call.asset = *asset;
    return -1;
  }
  call.route = FindHttpRoute(path);
  if (call.route == nullptr) {
    return RespondError(
        connection,
        MakeHttpError(404, "invalid_request_error", "not_found",
                      absl::StrCat("no route ", Loggable(path), "; the API is ", HttpRoutePaths(),
                                   " and the playground is at /")),
        nullptr);
  }
  if (!Allows(*call.route, verb)) {
    return RespondError(connection,
                        MakeHttpError(405, "invalid_request_error", "method_not_allowed",
                                      absl::StrCat("use ", call.route->allow)),
                        call.route->allow);
  }
  return AdmitApiCall(connection, call);
}

int HttpApiServer::AdmitApiCall(MHD_Connection* connection, Call& call) {
  call.key = keys_ == nullptr ? "" : kUnauthenticatedKey;
  if (draining_.load()) {
    Answer(call, absl::UnavailableError("the server is draining; retry on another instance"), "",
           0);
    return QueueAnswer(connection, call, true);
  }
  if (keys_ != nullptr) {
    absl::StatusOr<std::string> key =
        keys_->Authenticate(Header(connection, MHD_HTTP_HEADER_AUTHORIZATION));
    if (!key.ok()) {
      Answer(call, key.status(), "", 0);
      return QueueAnswer(connection, call, draining_.load());
    }
    call.key = *std::move(key);
  }
  uint64_t length = 0;
  const absl::string_view content_length = Header(connection, MHD_HTTP_HEADER_CONTENT_LENGTH);
  if (absl::SimpleAtoi(content_length, &length) &&
      length > static_cast<uint64_t>(options_.max_body_bytes)) {
    const absl::Status status = absl::OutOfRangeError(absl::StrCat(
        "the request body is ", length, " bytes; the limit is ", options_.max_body_bytes));
    const HttpError error = MakeHttpError(
        413, "invalid_request_error", "request_too_large", status.message(),
        call.route->errors == ErrorStyle::kNative ? absl::StatusCodeToString(status.code()) : "");
    Answer(call, status, "", 0, &error);
    return QueueAnswer(connection, call, draining_.load());
  }
  return -1;
}

int HttpApiServer::Dispatch(MHD_Connection* connection, const std::shared_ptr<Call>& call) {
  switch (call->route->call) {
    case HttpCall::kOpenAiModels:
      Answer(*call, absl::OkStatus(), ModelsResponseJson(backend_->ListModels(), created_), 0);
      break;
    case HttpCall::kListModels:
      ListModels(*call);
      break;
    case HttpCall::kTokenize:
      Tokenize(*call);
      break;
    case HttpCall::kGenerateStream:
      return StartStream(connection, call);
    case HttpCall::kImagesGenerations:
    case HttpCall::kGenerate:
      if (StartGeneration(connection, call)) return MHD_YES;  // on_done resumes it
      break;
  }
  return QueueAnswer(connection, *call, draining_.load());
}

void HttpApiServer::ListModels(Call& call) {
  v1::ListModelsRequest request;
  if (absl::Status s = ParseNativeJson(call.body, &request); !s.ok()) {
    Answer(call, s, "", 0);
    return;
  }
  AnswerJson(call, ToListModelsResponse(backend_->ListModels()));
}

void HttpApiServer::Tokenize(Call& call) {
  v1::TokenizeRequest request;
  absl::StatusOr<TokenizeResult> result = [&]() -> absl::StatusOr<TokenizeResult> {
    if (absl::Status s = ParseNativeJson(call.body, &request); !s.ok()) return s;
    if (absl::Status s = ValidateTokenizeRequest(request, options_.limits); !s.ok()) return s;
    return backend_->Tokenize(request.model(), request.text());
  }();
  call.model = result.ok() ? result->model : request.model();
  if (!result.ok()) {
    Answer(call, WithParam(call, result.status()), "", 0);
    return;
  }
  AnswerJson(call, ToTokenizeResponse(*std::move(result)));
}

absl::StatusOr<v1::GenerateRequest> HttpApiServer::ParseGenerateRequest(MHD_Connection* connection,
                                                                        Call& call) const {
  const absl::string_view request_id = Header(connection, "X-Request-Id");
  if (call.route->call == HttpCall::kImagesGenerations) {
    absl::StatusOr<ImagesRequest> parsed = ParseImagesRequest(call.body, options_.model_aliases);
    if (!parsed.ok()) return parsed.status();
    call.user = parsed->user;
    parsed->request.set_request_id(std::string(request_id));
    return std::move(parsed->request);
  }
  v1::GenerateRequest request;
  if (absl::Status s = ParseNativeJson(call.body, &request); !s.ok()) return s;
  if (request.request_id().empty()) request.set_request_id(std::string(request_id));
  return request;
}

absl::StatusOr<GenerateParams> HttpApiServer::Prepare(MHD_Connection* connection,
                                                      Call& call) const {
  absl::StatusOr<v1::GenerateRequest> request = ParseGenerateRequest(connection, call);
  if (!request.ok()) return request.status();
  call.model = request->model();
  call.request_id = request->request_id();
  absl::StatusOr<absl::Time> deadline = DeadlineOf(Header(connection, "X-Request-Timeout"));
  if (!deadline.ok()) return deadline.status();
  absl::StatusOr<GenerateParams> params = ToGenerateParams(*request, options_.limits, *deadline);
  if (!params.ok()) return params;
  absl::StatusOr<std::string> model = backend_->ResolveModel(params->model);
  if (!model.ok()) return model.status();
  params->model = *std::move(model);
  call.model = params->model;
  if (keys_ != nullptr) {
    if (absl::Status s = keys_->Admit(call.key, params->num_images); !s.ok()) return s;
  }
  return params;
}

absl::StatusOr<std::string> HttpApiServer::GenerationBody(const Call& call,
                                                          GenerateResult result) const {
  if (call.route->call == HttpCall::kImagesGenerations) {
    return ImagesResponseJson(result, absl::Now());
  }
  return ToNativeJson(ToGenerateResponse(call.request_id, std::move(result)));
}

bool HttpApiServer::StartGeneration(MHD_Connection* connection,
                                    const std::shared_ptr<Call>& call) {
  absl::StatusOr<GenerateParams> params = Prepare(connection, *call);
  if (!params.ok()) return Answer(*call, WithParam(*call, params.status()), "", 0);
  GenerateCallbacks callbacks;
  callbacks.on_done = [this, call, connection](absl::Status status, GenerateResult result) {
    const int images = status.ok() ? static_cast<int>(result.images.size()) : 0;
    absl::StatusOr<std::string> body = status.ok() ? GenerationBody(*call, std::move(result))
                                                   : absl::StatusOr<std::string>(status);
    if (Answer(*call, body.status(), body.ok() ? *std::move(body) : std::string(),
               body.ok() ? images : 0)) {
      MHD_resume_connection(connection);
    }
  };
  absl::Status submitted =
      SubmitCounted(*backend_, *metrics_, *std::move(params), std::move(callbacks));
  if (!submitted.ok()) return Answer(*call, WithParam(*call, submitted), "", 0);
  // on_done may already have answered (then the caller queues the answer at once); otherwise
  // the connection waits, suspended, for on_done to resume it.
  absl::MutexLock lock(&call->mu);
  if (call->answered) return false;
  call->suspended = true;
  MHD_suspend_connection(connection);
  return true;
}

int HttpApiServer::StartStream(MHD_Connection* connection, const std::shared_ptr<Call>& call) {
  absl::StatusOr<GenerateParams> params = Prepare(connection, *call);
  if (!params.ok()) {
    Answer(*call, WithParam(*call, params.status()), "", 0);
    return QueueAnswer(connection, *call, draining_.load());
  }
  auto stream = std::make_shared<HttpStream>(connection);
  // An image that cannot be printed (never for the server's own messages) fails the stream.
  auto print_failure = std::make_shared<absl::Status>();
  GenerateCallbacks callbacks;
  callbacks.on_image = [stream, print_failure, request_id = call->request_id, model = call->model](
                           GeneratedImage image, const GenerateResult& so_far) {
    absl::StatusOr<std::string> line =
        ToNativeJson(ToStreamedImage(request_id, model, std::move(image), so_far));
    if (line.ok()) {
      stream->AddLine(*std::move(line));
    } else {
      *print_failure = line.status();
    }
  };
  callbacks.on_done = [this, call, stream, print_failure](absl::Status status, GenerateResult) {
    if (status.ok()) status = *print_failure;
    const std::string error_line = ToHttpError(status, ErrorStyle::kNative).body;
    if (std::optional<HttpStream::Outcome> outcome = stream->Close(status, error_line)) {
      Record(*call, outcome->status, MHD_HTTP_OK, outcome->status.ok() ? outcome->lines : 0);
    }
  };
  callbacks.is_cancelled = [stream] { return stream->client_gone(); };
  call->stream = stream;
  absl::Status submitted =
      SubmitCounted(*backend_, *metrics_, *std::move(params), std::move(callbacks));
  if (!submitted.ok()) {
    call->stream = nullptr;
    Answer(*call, WithParam(*call, submitted), "", 0);
    return QueueAnswer(connection, *call, draining_.load());
  }
  if (stream->SuspendUntilFirstEvent()) return MHD_YES;  // the first image or the end resumes it
  return QueueStream(connection, *call);
}

int HttpApiServer::QueueStream(MHD_Connection* connection, Call& call) {
  if (absl::Status failed = call.stream->Start(); !failed.ok()) {
    Answer(call, failed, "", 0);
    return QueueAnswer(connection, call, draining_.load());
  }
  MHD_Response* response = HttpStream::CreateResponse(call.stream);
  if (response == nullptr) return MHD_NO;  // out of memory: the connection closes
  MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, kNdjsonContentType);
  MHD_add_response_header(response, MHD_HTTP_HEADER_X_CONTENT_TYPE_OPTIONS, kNoSniff);
  if (draining_.load()) MHD_add_response_header(response, MHD_HTTP_HEADER_CONNECTION, "close");
  const MHD_Result queued = MHD_queue_response(connection, MHD_HTTP_OK, response);
  MHD_destroy_response(response);
  return queued;
}

bool HttpApiServer::Answer(Call& call, const absl::Status& status, std::string body, int images,
                           const HttpError* error) {
  HttpError failure = error != nullptr ? *error : HttpError{200, std::move(body)};
  if (error == nullptr && !status.ok()) failure = ToHttpError(status, call.route->errors);
  Record(call, status, failure.http_status, images);
  absl::MutexLock lock(&call.mu);
  call.answered = true;
  call.http_status = failure.http_status;
  call.response = std::move(failure.body);
  call.retry_after = status.code() == absl::StatusCode::kResourceExhausted;
  const bool was_suspended = call.suspended;
  call.suspended = false;
  return was_suspended;
}

bool HttpApiServer::AnswerJson(Call& call, const google::protobuf::Message& message) {
  absl::StatusOr<std::string> body = ToNativeJson(message);
  return Answer(call, body.status(), body.ok() ? *std::move(body) : std::string(), 0);
}

void HttpApiServer::Record(const Call& call, const absl::Status& status, int http_status,
                           int images) {
  const absl::Duration elapsed = absl::Now() - call.started;
  const auto code = static_cast<grpc::StatusCode>(status.code());
  metrics_->RecordRequest(call.route->method, call.model, code, elapsed, images);
  if (keys_ != nullptr) metrics_->RecordKeyRequest(call.key, code, images);
  spdlog::info("rpc={} request_id={} model={}{}{} images={} code={} http={} seconds={:.4f}{}",
               RpcMethodName(call.route->method), Loggable(call.request_id), Loggable(call.model),
               keys_ != nullptr ? absl::StrCat(" key=", call.key) : "",
               call.user.empty() ? "" : absl::StrCat(" user=", Loggable(call.user)), images,
               GrpcCodeName(code), http_status, absl::ToDoubleSeconds(elapsed),
               status.ok() ? "" : absl::StrCat(" error=\"", status.message(), "\""));
}

}  // namespace dmdserve
