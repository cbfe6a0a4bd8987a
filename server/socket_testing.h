// Test-only raw TCP clients for the servers' tests (metrics_http_test.cc, http_server_test.cc):
// what libcurl cannot do, such as half a request, a stalled connection or a reset mid-response.
//
// Thread safety: free functions on fds the caller owns.
#ifndef DMDSERVE_SERVER_SOCKET_TESTING_H_
#define DMDSERVE_SERVER_SOCKET_TESTING_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "absl/time/time.h"

namespace dmdserve {

// A connected TCP socket to 127.0.0.1:`port` whose reads time out after `read_timeout` (so a
// broken server fails a test instead of hanging it); -1 on failure. The caller closes it.
inline int ConnectLoopback(int port, absl::Duration read_timeout = absl::Seconds(10)) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const timeval timeout = absl::ToTimeval(read_timeout);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Whether all of `bytes` went out on `fd`.
inline bool SendAll(int fd, const std::string& bytes) {
  size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

// Reads from `fd` until what came holds `marker` (empty: until the peer closes), the connection
// ends or a read times out; returns what came.
inline std::string ReceiveUntil(int fd, const std::string& marker = "") {
  std::string received;
  char buffer[4096];
  while (marker.empty() || received.find(marker) == std::string::npos) {
    const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
    if (n <= 0) break;
    received.append(buffer, static_cast<size_t>(n));
  }
  return received;
}

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_SOCKET_TESTING_H_
