// A listening TCP socket for the libmicrohttpd servers (metrics_http.h, http_server.h), which
// bind it themselves so that a port in use is reported as such and port 0 can be read back.
#ifndef DMDSERVE_SERVER_TCP_LISTEN_H_
#define DMDSERVE_SERVER_TCP_LISTEN_H_

#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"

namespace dmdserve {

// Binds and listens (non-blocking, close-on-exec, SO_REUSEADDR, an accept queue of SOMAXCONN) on
// host:port (the first address of `host` that binds); the bound port through `bound_port`.
// UNAVAILABLE "cannot listen for <what> on host:port: <reason>" otherwise.
absl::StatusOr<int> ListenTcp(const std::string& host, int port, absl::string_view what,
                              int& bound_port);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_TCP_LISTEN_H_
