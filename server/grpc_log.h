// gRPC's own log lines (gpr_log) routed into spdlog, and a report when gRPC's listener stops.
//
// gRPC writes its errors to stderr in a format of its own; routed here they share the server's
// format (text or JSON, --log_format) and level filter.
//
// gRPC 1.51's TCP listener stops accepting for good when accept4() fails with an error other than
// EINTR/EAGAIN -- EMFILE at the open-file limit above all: it logs "Failed accept4: <reason>" and
// stops watching the socket, so the port stays bound while new connections time out, and the
// process, still serving its open connections, looks alive. (Later gRPC versions retry.) No API
// reports it, so this watches for that line and calls `on_listener_failed` with the reason; the
// server then drains and exits non-zero, so that a supervisor restarts it with a fresh listener.
//
// Install once at start-up, before any gRPC object exists. `on_listener_failed` runs on a gRPC
// thread, at most once; it must not block.
#ifndef DMDSERVE_SERVER_GRPC_LOG_H_
#define DMDSERVE_SERVER_GRPC_LOG_H_

#include <functional>
#include <string>

namespace dmdserve {

void RouteGrpcLogsToSpdlog(std::function<void(const std::string& reason)> on_listener_failed);

// The reason in gRPC's "Failed accept4: <reason>" line, or "" for any other line.
std::string ListenerFailure(const char* message);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_GRPC_LOG_H_
