#include "server/metrics_http.h"

#include <fcntl.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/tcp_listen.h"
#include "spdlog/spdlog.h"

namespace dmdserve {
namespace {

constexpr char kMetricsContentType[] = "text/plain; version=0.0.4; charset=utf-8";
constexpr char kTextContentType[] = "text/plain; charset=utf-8";

// The daemon's one thread: a fixed, generous stack (see the header comment for why it matters).
constexpr size_t kThreadStackBytes = size_t{8} << 20;
// Connections open at once, in all and from one IP address. Prometheus keeps one scrape in
// flight per target (two with an HA pair); the rest of the room is for curl and probes.
constexpr unsigned int kMaxConnections = 64;
constexpr unsigned int kMaxConnectionsPerIp = 16;
// libmicrohttpd reads the request line and headers into a per-connection memory pool that also
// holds the parsed header index and the response's headers; a request that does not fit is
// answered 431 (414 when the request line alone does not fit). The pool is max_request_bytes
// plus this much room for the rest.
constexpr size_t kPoolOverheadBytes = 1024;

// True on a thread while it runs MHD_start_daemon: its log lines then explain a failed start and
// are warnings; later ones (a client that timed out, the connection limit) are debug lines, so
// that a flood of connections cannot flood the log.
thread_local bool t_starting_daemon = false;

void LogFromMhd(void* /*closure*/, const char* format, va_list args) {
  char line[512];
  std::vsnprintf(line, sizeof(line), format, args);
  absl::string_view text(line);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.remove_suffix(1);
  if (t_starting_daemon) {
    spdlog::warn("/metrics (libmicrohttpd): {}", std::string(text));
  } else {
    spdlog::debug("/metrics (libmicrohttpd): {}", std::string(text));
  }
}

// Queues a `Connection: close` response with `body` (libmicrohttpd drops the body for HEAD and
// sets Content-Length itself).
MHD_Result Respond(MHD_Connection* connection, unsigned int code, const char* content_type,
                   const std::string& body, const char* allow = nullptr) {
  MHD_Response* response = MHD_create_response_from_buffer(
      body.size(), const_cast<char*>(body.data()), MHD_RESPMEM_MUST_COPY);
  if (response == nullptr) return MHD_NO;  // out of memory: libmicrohttpd closes the connection
  MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
  MHD_add_response_header(response, MHD_HTTP_HEADER_CONNECTION, "close");
  if (allow != nullptr) MHD_add_response_header(response, MHD_HTTP_HEADER_ALLOW, allow);
  const MHD_Result queued = MHD_queue_response(connection, code, response);
  MHD_destroy_response(response);
  return queued;
}

// libmicrohttpd's request handler (MHD_AccessHandlerCallback), on the daemon's thread. It answers
// on the first call, once the headers are in; a request body, if any, is discarded. `url` comes
// without its query string.
MHD_Result HandleRequest(void* closure, MHD_Connection* connection, const char* url,
                         const char* method, const char* /*version*/, const char* /*upload_data*/,
                         size_t* /*upload_data_size*/, void** /*request_state*/) {
  const auto* options = static_cast<const MetricsHttpServer::Options*>(closure);
  const absl::string_view path(url);
  const absl::string_view verb(method);
  if (path.empty() || path[0] != '/') {
    return Respond(connection, MHD_HTTP_BAD_REQUEST, kTextContentType, "malformed request line\n");
  }
  if (path != "/metrics") {
    return Respond(connection, MHD_HTTP_NOT_FOUND, kTextContentType,
                   "not found; metrics are at /metrics\n");
  }
  if (verb != MHD_HTTP_METHOD_GET && verb != MHD_HTTP_METHOD_HEAD) {
    return Respond(connection, MHD_HTTP_METHOD_NOT_ALLOWED, kTextContentType, "use GET\n",
                   "GET, HEAD");
  }
  return Respond(connection, MHD_HTTP_OK, kMetricsContentType, options->render());
}

unsigned int TimeoutSeconds(absl::Duration io_timeout) {
  const int64_t seconds = absl::ToInt64Seconds(absl::Ceil(io_timeout, absl::Seconds(1)));
  return static_cast<unsigned int>(
      std::clamp<int64_t>(seconds, 1, std::numeric_limits<unsigned int>::max()));
}

// Starts the daemon on the listening socket `fd`; nullptr when it cannot start (the reason is
// logged). On success the daemon owns `fd` and closes it when stopped.
MHD_Daemon* StartDaemon(int fd, const MetricsHttpServer::Options& options) {
  const size_t pool_bytes = static_cast<size_t>(options.max_request_bytes) + kPoolOverheadBytes;
  t_starting_daemon = true;
  // One option and its value(s) a line; each value has the type <microhttpd.h> documents for its
  // option (they travel through varargs).
  // clang-format off
  MHD_Daemon* daemon = MHD_start_daemon(
      MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ITC | MHD_USE_ERROR_LOG, /*port=*/0,
      /*apc=*/nullptr, /*apc_cls=*/nullptr, &HandleRequest,
      const_cast<MetricsHttpServer::Options*>(&options),
      MHD_OPTION_EXTERNAL_LOGGER, &LogFromMhd, nullptr,
      MHD_OPTION_LISTEN_SOCKET, static_cast<MHD_socket>(fd),
      MHD_OPTION_THREAD_STACK_SIZE, kThreadStackBytes,
      MHD_OPTION_CONNECTION_TIMEOUT, TimeoutSeconds(options.io_timeout),
      MHD_OPTION_CONNECTION_LIMIT, kMaxConnections,
      MHD_OPTION_PER_IP_CONNECTION_LIMIT, kMaxConnectionsPerIp,
      MHD_OPTION_CONNECTION_MEMORY_LIMIT, pool_bytes,
      MHD_OPTION_END);
  // clang-format on
  t_starting_daemon = false;
  return daemon;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Create(Options options) {
  if (!options.render) return absl::InvalidArgumentError("MetricsHttpServer: render is required");
  if (options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics port must be in [0, 65535], got ", options.port));
  }
  if (options.io_timeout <= absl::ZeroDuration() || options.max_request_bytes < 64) {
    return absl::InvalidArgumentError(
        "MetricsHttpServer: io_timeout must be > 0 and max_request_bytes >= 64");
  }
  int port = 0;
  absl::StatusOr<int> fd = ListenTcp(options.host, options.port, "/metrics", port);
  if (!fd.ok()) return fd.status();
  // Constructed before the daemon starts: the handler's closure is its options_.
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer(std::move(options)));
  server->port_ = port;
  server->daemon_ = StartDaemon(*fd, server->options_);
  if (server->daemon_ == nullptr) {
    // Whether a failed start closed `fd` differs between libmicrohttpd releases; leaving it open
    // (the process is about to exit) is safer than closing a number another thread may reuse.
    return absl::InternalError(absl::StrCat("cannot start the /metrics server on ",
                                            server->options_.host, ":", port,
                                            " (libmicrohttpd; its reason is logged above)"));
  }
  return server;
}

MetricsHttpServer::~MetricsHttpServer() {
  // Joins the daemon's thread, closes its connections and the listening socket.
  if (daemon_ != nullptr) MHD_stop_daemon(daemon_);
}

}  // namespace dmdserve
