#include "server/status_util.h"

#include <string>

#include "gtest/gtest.h"

namespace dmdserve {
namespace {

TEST(StatusUtilTest, MapsEveryCanonicalCodeAndKeepsTheMessage) {
  const std::pair<absl::Status, grpc::StatusCode> cases[] = {
      {absl::InvalidArgumentError("prompt is required"), grpc::StatusCode::INVALID_ARGUMENT},
      {absl::NotFoundError("model 'x'"), grpc::StatusCode::NOT_FOUND},
      {absl::ResourceExhaustedError("queue full"), grpc::StatusCode::RESOURCE_EXHAUSTED},
      {absl::DeadlineExceededError("late"), grpc::StatusCode::DEADLINE_EXCEEDED},
      {absl::CancelledError("gone"), grpc::StatusCode::CANCELLED},
      {absl::UnavailableError("draining"), grpc::StatusCode::UNAVAILABLE},
      {absl::InternalError("model failed"), grpc::StatusCode::INTERNAL},
  };
  for (const auto& [in, code] : cases) {
    grpc::Status out = ToGrpcStatus(in);
    EXPECT_EQ(out.error_code(), code) << in;
    EXPECT_EQ(out.error_message(), std::string(in.message()));
  }
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
}

TEST(StatusUtilTest, CutsLongMessages) {
  grpc::Status out = ToGrpcStatus(absl::InternalError(std::string(5000, 'x')));
  EXPECT_EQ(out.error_message().size(), 1024u);
}

}  // namespace
}  // namespace dmdserve
