#include "server/tcp_listen.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;

// A non-blocking connect to 127.0.0.1:`port` under way; -1 on failure.
int StartConnect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 &&
      errno != EINPROGRESS) {
    close(fd);
    return -1;
  }
  return fd;
}

// How many of `fds` finish their handshake within `wait`.
int Connected(const std::vector<int>& fds, absl::Duration wait) {
  std::vector<pollfd> polls;
  for (int fd : fds) polls.push_back({fd, POLLOUT, 0});
  const absl::Time give_up = absl::Now() + wait;
  int connected = 0;
  while (absl::Now() < give_up) {
    poll(polls.data(), polls.size(), 10);
    connected = static_cast<int>(std::count_if(polls.begin(), polls.end(), [](const pollfd& p) {
      int error = 0;
      socklen_t length = sizeof(error);
      return (p.revents & POLLOUT) != 0 &&
             getsockopt(p.fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0 && error == 0;
    }));
    if (connected == static_cast<int>(fds.size())) break;
  }
  return connected;
}

int KernelListenLimit() {
  std::ifstream file("/proc/sys/net/core/somaxconn");
  int limit = 128;
  file >> limit;
  return limit;
}

// A burst of clients that connect before the server accepts any: each one completes its
// handshake in the accept queue instead of having its SYN dropped (and retried a second later).
TEST(ListenTcpTest, AcceptQueueHoldsABurstOfNewConnections) {
  int port = 0;
  absl::StatusOr<int> listener = ListenTcp("127.0.0.1", 0, "the test", port);
  ASSERT_TRUE(listener.ok()) << listener.status();
  ASSERT_GT(port, 0);
  const int burst = std::min(200, KernelListenLimit());
  std::vector<int> clients;
  for (int i = 0; i < burst; ++i) {
    const int fd = StartConnect(port);
    ASSERT_GE(fd, 0) << "connect " << i << ": " << std::strerror(errno);
    clients.push_back(fd);
  }
  // Under TCP's 1-s SYN retransmission: a client whose SYN was dropped is still waiting.
  EXPECT_EQ(Connected(clients, absl::Milliseconds(500)), burst);
  for (int fd : clients) close(fd);
  close(*listener);
}

TEST(ListenTcpTest, PortInUseIsUnavailableNamingWhatAndWhere) {
  int port = 0;
  absl::StatusOr<int> first = ListenTcp("127.0.0.1", 0, "the first", port);
  ASSERT_TRUE(first.ok()) << first.status();
  int unused = 0;
  absl::StatusOr<int> second = ListenTcp("127.0.0.1", port, "the HTTP API", unused);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(second.status().message()),
              HasSubstr(absl::StrCat("cannot listen for the HTTP API on 127.0.0.1:", port)));
  close(*first);
}

}  // namespace
}  // namespace dmdserve
