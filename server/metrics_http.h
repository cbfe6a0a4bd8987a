// MetricsHttpServer: the /metrics HTTP endpoint that Prometheus scrapes, on its own port and its
// own thread, so that a scrape never waits behind the model queue.
//
// What it is: GNU libmicrohttpd (Debian 12's libmicrohttpd12) with its internal polling thread:
// one event-driven thread (epoll on Linux, MHD_USE_AUTO) multiplexes every connection, so a
// client that connects and then stalls (sends half a request, or never reads the response) holds
// one connection slot and nothing else: other scrapes are parsed and answered meanwhile. (The
// hand-written server this replaces served one connection at a time, so each stalled connection
// delayed every scrape by the whole I/O timeout.)
//
// Why not prometheus-cpp's Exposer: it runs on civetweb, whose Debian build gives its threads a
// compiled-in 100 KiB stack. glibc places the static thread-local storage of every loaded library
// on each thread's stack, and OpenBLAS built with OpenMP alone needs 60 KiB of it, so with that
// BLAS installed (libtorch's linear layers are ~6x faster on it) civetweb could not start a single
// thread and dmdserve did not start. This server's only thread gets an explicit 8 MiB stack
// (MHD_OPTION_THREAD_STACK_SIZE), of which the TLS takes its 60 KiB-odd. 0 would leave the size
// to glibc: the soft RLIMIT_STACK at process start (8 MiB under Debian's `ulimit -s`), raised to
// fit the static TLS; the explicit size keeps the stack the same under any `ulimit -s` (checked:
// the tests pass under `ulimit -s 512` with 1 MiB of TLS preloaded).
//
// What it speaks: HTTP/1.x, one request per connection (every response says `Connection: close`).
//   GET or HEAD /metrics (any query string) -> 200, `text/plain; version=0.0.4` (Prometheus text
//     format), the body from Options.render at the time of the request;
//   another path -> 404; another method -> 405 with `Allow: GET, HEAD`; a path that does not
//     start with `/` -> 400; a request line libmicrohttpd cannot parse at all (no method, path
//     and version) -> the connection is closed unanswered; headers over
//     Options.max_request_bytes -> 431, a request line alone over it -> 414 and the connection
//     closed with the line unread (so a client may see only the reset). The limit is approximate:
//     libmicrohttpd's per-connection memory pool is sized from it, see metrics_http.cc.
// Limits: a client that sends or reads nothing for Options.io_timeout (rounded up to whole
// seconds, libmicrohttpd's granularity) is dropped; at most 64 connections are open at once, at
// most 16 from one IP address (further ones are closed as soon as accepted). A scrape is one
// small request every few seconds from one or two Prometheus servers. The timeout counts silence,
// not the whole request: a client trickling a byte at a time keeps its connection, which costs
// one of those slots and never another scrape's time.
//
// Ownership: owns the libmicrohttpd daemon, its listening socket and its thread; the destructor
// stops them (open connections are closed). Thread safety: port() is thread-safe; `render` is
// called on the server's thread, one call at a time, and must be thread-safe with respect to the
// rest of the program.
#ifndef DMDSERVE_SERVER_METRICS_HTTP_H_
#define DMDSERVE_SERVER_METRICS_HTTP_H_

#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

struct MHD_Daemon;  // <microhttpd.h>

namespace dmdserve {

class MetricsHttpServer {
 public:
  struct Options {
    // Address to listen on: a numeric IPv4/IPv6 address or a host name. Default all IPv4
    // interfaces.
    std::string host = "0.0.0.0";
    // TCP port; 0 picks a free port (see port()). Default 9464, Prometheus' exporter convention.
    int port = 9464;
    // Longest a client may stay silent while sending its request or taking the response; rounded
    // up to whole seconds. Default 5 s.
    absl::Duration io_timeout = absl::Seconds(5);
    // Largest request line + headers accepted, in bytes (approximately, see the header comment).
    // Default 8 KiB.
    int max_request_bytes = 8192;
    // The response body of GET /metrics (required).
    std::function<std::string()> render;
  };

  // Binds and listens, then starts serving. UNAVAILABLE naming host:port when the address cannot
  // be bound; INVALID_ARGUMENT for bad options; INTERNAL when libmicrohttpd cannot start (its
  // reason in the message).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Create(Options options);
  ~MetricsHttpServer();

  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // The port listened on (the chosen one when Options.port was 0).
  int port() const { return port_; }

 private:
  explicit MetricsHttpServer(Options options) : options_(std::move(options)) {}

  // Read by the daemon's thread through the request handler's closure pointer: lives as long as
  // daemon_.
  const Options options_;
  MHD_Daemon* daemon_ = nullptr;  // owned; stopped by the destructor
  int port_ = 0;
};

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_METRICS_HTTP_H_
