#include "server/grpc_log.h"

#include <grpc/support/log.h>

#include <atomic>
#include <cstring>
#include <utility>

#include "spdlog/spdlog.h"

namespace dmdserve {
namespace {

// Set once by RouteGrpcLogsToSpdlog(), before gRPC logs anything; read on gRPC's threads.
std::function<void(const std::string&)>* listener_failed = nullptr;
std::atomic<bool> reported{false};

spdlog::level::level_enum LevelOf(gpr_log_severity severity) {
  switch (severity) {
    case GPR_LOG_SEVERITY_DEBUG:
      return spdlog::level::debug;
    case GPR_LOG_SEVERITY_INFO:
      return spdlog::level::info;
    case GPR_LOG_SEVERITY_ERROR:
      break;
  }
  return spdlog::level::err;
}

void Log(gpr_log_func_args* args) {
  const char* file = std::strrchr(args->file, '/');
  spdlog::log(LevelOf(args->severity), "grpc {}:{}: {}", file == nullptr ? args->file : file + 1,
              args->line, args->message);
  const std::string reason = ListenerFailure(args->message);
  if (!reason.empty() && listener_failed != nullptr && !reported.exchange(true)) {
    (*listener_failed)(reason);
  }
}

}  // namespace

std::string ListenerFailure(const char* message) {
  constexpr char kPrefix[] = "Failed accept4: ";
  if (std::strncmp(message, kPrefix, sizeof(kPrefix) - 1) != 0) return "";
  return message + sizeof(kPrefix) - 1;
}

void RouteGrpcLogsToSpdlog(std::function<void(const std::string& reason)> on_listener_failed) {
  listener_failed = new std::function<void(const std::string&)>(std::move(on_listener_failed));
  gpr_set_log_function(&Log);
}

}  // namespace dmdserve
