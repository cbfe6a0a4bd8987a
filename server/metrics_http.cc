#include "server/metrics_http.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace dmdserve {
namespace {

constexpr char kMetricsContentType[] = "text/plain; version=0.0.4; charset=utf-8";
constexpr char kTextContentType[] = "text/plain; charset=utf-8";

void SetNonBlocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK); }

// Binds a listening socket for host:port; the bound port through `bound_port`.
absl::StatusOr<int> Listen(const std::string& host, int port, int& bound_port) {
  const std::string where = absl::StrCat(host, ":", port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &found);
      rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen for /metrics on ", where, ": ", gai_strerror(rc)));
  }
  std::string error = "no address";
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      error = std::strerror(errno);
      continue;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 64) != 0) {
      error = std::strerror(errno);
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen for /metrics on ", where, ": ", error));
  }
  sockaddr_storage bound{};
  socklen_t length = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &length);
  bound_port = bound.ss_family == AF_INET6
                   ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                   : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  SetNonBlocking(fd);
  return fd;
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
  absl::StatusOr<int> fd = Listen(options.host, options.port, port);
  if (!fd.ok()) return fd.status();
  int wake[2];
  if (pipe2(wake, O_CLOEXEC | O_NONBLOCK) != 0) {
    close(*fd);
    return absl::InternalError(absl::StrCat("MetricsHttpServer: pipe: ", std::strerror(errno)));
  }
  return std::unique_ptr<MetricsHttpServer>(
      new MetricsHttpServer(std::move(options), *fd, port, wake[0], wake[1]));
}

MetricsHttpServer::MetricsHttpServer(Options options, int listen_fd, int port, int wake_read,
                                     int wake_write)
    : options_(std::move(options)),
      listen_fd_(listen_fd),
      port_(port),
      wake_read_(wake_read),
      wake_write_(wake_write),
      thread_([this] { Serve(); }) {}

MetricsHttpServer::~MetricsHttpServer() {
  stopping_ = true;
  const char byte = 0;
  [[maybe_unused]] ssize_t written = write(wake_write_, &byte, 1);
  thread_.join();
  close(listen_fd_);
  close(wake_read_);
  close(wake_write_);
}

bool MetricsHttpServer::WaitFor(int fd, short events, absl::Time deadline) {
  while (!stopping_) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return false;
    pollfd fds[2] = {{fd, events, 0}, {wake_read_, POLLIN, 0}};
    const int timeout_ms = static_cast<int>(absl::ToInt64Milliseconds(left)) + 1;
    const int n = poll(fds, 2, deadline == absl::InfiniteFuture() ? -1 : timeout_ms);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || fds[1].revents != 0) return false;
    if (fds[0].revents != 0) return true;
  }
  return false;
}

void MetricsHttpServer::Serve() {
  while (WaitFor(listen_fd_, POLLIN, absl::InfiniteFuture())) {
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      // The client went away (retry at once), or the process is out of descriptors or memory:
      // the pending connection stays queued, so wait instead of spinning on it.
      if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      continue;
    }
    HandleConnection(fd);
    close(fd);
  }
}

bool MetricsHttpServer::ReadHead(int fd, std::string& head, bool& too_long) {
  too_long = false;
  const absl::Time deadline = absl::Now() + options_.io_timeout;
  char buffer[2048];
  const size_t limit = static_cast<size_t>(options_.max_request_bytes);
  size_t end;
  while ((end = std::min(head.find("\r\n\r\n"), head.find("\n\n"))) == std::string::npos) {
    if (head.size() > limit) break;
    if (!WaitFor(fd, POLLIN, deadline)) return false;
    const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n <= 0) return false;
    head.append(buffer, static_cast<size_t>(n));
  }
  too_long = end == std::string::npos || end > limit;
  return !too_long;
}

void MetricsHttpServer::HandleConnection(int fd) {
  std::string head;
  bool too_long = false;
  if (!ReadHead(fd, head, too_long)) {
    if (too_long) {
      Respond(fd, 431, "Request Header Fields Too Large", kTextContentType,
              "request headers too large\n", true);
    }
    return;
  }
  const absl::string_view line = absl::string_view(head).substr(0, head.find_first_of("\r\n"));
  const std::vector<absl::string_view> parts = absl::StrSplit(line, ' ');
  if (parts.size() != 3 || !absl::StartsWith(parts[2], "HTTP/1.") || parts[1].empty() ||
      parts[1][0] != '/') {
    Respond(fd, 400, "Bad Request", kTextContentType, "malformed request line\n", true);
    return;
  }
  const absl::string_view method = parts[0];
  const absl::string_view path = parts[1].substr(0, parts[1].find('?'));
  if (path != "/metrics") {
    Respond(fd, 404, "Not Found", kTextContentType, "not found; metrics are at /metrics\n",
            method != "HEAD");
    return;
  }
  if (method != "GET" && method != "HEAD") {
    Respond(fd, 405, "Method Not Allowed", kTextContentType, "use GET\n", true,
            "Allow: GET, HEAD\r\n");
    return;
  }
  Respond(fd, 200, "OK", kMetricsContentType, options_.render(), method == "GET");
}

void MetricsHttpServer::Respond(int fd, int code, const std::string& reason,
                                const std::string& content_type, const std::string& body,
                                bool send_body, const std::string& extra_headers) {
  std::string response = absl::StrCat(
      "HTTP/1.1 ", code, " ", reason, "\r\nContent-Type: ", content_type,
      "\r\nContent-Length: ", body.size(), "\r\n", extra_headers, "Connection: close\r\n\r\n");
  if (send_body) response += body;
  const absl::Time deadline = absl::Now() + options_.io_timeout;
  size_t sent = 0;
  while (sent < response.size()) {
    if (!WaitFor(fd, POLLOUT, deadline)) return;
    const ssize_t n = send(fd, response.data() + sent, response.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n <= 0) return;
    sent += static_cast<size_t>(n);
  }
  shutdown(fd, SHUT_WR);
}

}  // namespace dmdserve
