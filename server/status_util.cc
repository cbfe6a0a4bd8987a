#include "server/status_util.h"

#include <string>

namespace dmdserve {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  constexpr size_t kMaxMessageBytes = 1024;
  std::string message(status.message().substr(0, kMaxMessageBytes));
  // absl and gRPC share the canonical code numbering (google.rpc.Code).
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), message);
}

}  // namespace dmdserve
