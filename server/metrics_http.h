// MetricsHttpServer: the /metrics HTTP endpoint that Prometheus scrapes, on its own port and its
// own thread, so that a scrape never waits behind the model queue.
//
// Why not prometheus-cpp's Exposer: it runs on civetweb, whose Debian build gives its threads a
// compiled-in 100 KiB stack. glibc places the static thread-local storage of every loaded library
// on each thread's stack, and OpenBLAS built with OpenMP alone needs 60 KiB of it, so with that
// BLAS installed (libtorch's linear layers are ~6x faster on it) civetweb could not start a single
// thread and dmdserve did not start. This server's thread has the default stack.
//
// What it speaks: HTTP/1.x, one request per connection (`Connection: close`), served one
// connection at a time — a scrape is one small request every few seconds.
//   GET or HEAD /metrics (any query string) -> 200, `text/plain; version=0.0.4` (Prometheus text
//     format), the body from Options.render at the time of the request;
//   another path -> 404; another method -> 405; a malformed request line -> 400; request headers
//     over Options.max_request_bytes -> 431. A client that sends or reads nothing for
//     Options.io_timeout is dropped.
//
// Ownership: owns its listening socket and thread; the destructor stops both (an unfinished
// connection is closed). Thread safety: port() is thread-safe; `render` is called on the server's
// thread, one call at a time, and must be thread-safe with respect to the rest of the program.
#ifndef DMDSERVE_SERVER_METRICS_HTTP_H_
#define DMDSERVE_SERVER_METRICS_HTTP_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace dmdserve {

class MetricsHttpServer {
 public:
  struct Options {
    // Address to listen on: a numeric IPv4/IPv6 address or a host name. Default all IPv4
    // interfaces.
    std::string host = "0.0.0.0";
    // TCP port; 0 picks a free port (see port()). Default 9464, Prometheus' exporter convention.
    int port = 9464;
    // Longest a client may take to send its request, or to take the response. Default 5 s.
    absl::Duration io_timeout = absl::Seconds(5);
    // Largest request line + headers accepted, in bytes. Default 8 KiB.
    int max_request_bytes = 8192;
    // The response body of GET /metrics (required).
    std::function<std::string()> render;
  };

  // Binds and listens, then starts serving. UNAVAILABLE naming host:port when the address cannot
  // be bound; INVALID_ARGUMENT for bad options.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Create(Options options);
  ~MetricsHttpServer();

  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // The port listened on (the chosen one when Options.port was 0).
  int port() const { return port_; }

 private:
  MetricsHttpServer(Options options, int listen_fd, int port, int wake_read, int wake_write);

  void Serve();
  void HandleConnection(int fd);
  // Reads the request head into `head`; false when the client is gone, too slow or too long
  // (then `too_long` says which).
  bool ReadHead(int fd, std::string& head, bool& too_long);
  void Respond(int fd, int code, const std::string& reason, const std::string& content_type,
               const std::string& body, bool send_body, const std::string& extra_headers = "");
  // Waits until `fd` is ready for `events` or the wake pipe fires; false on timeout or stop.
  bool WaitFor(int fd, short events, absl::Time deadline);

  const Options options_;
  const int listen_fd_;
  const int port_;
  const int wake_read_;  // a byte written to wake_write_ stops the thread
  const int wake_write_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_METRICS_HTTP_H_
