#include "server/grpc_log.h"

#include <grpc/grpc.h>
#include <grpc/support/log.h>

#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "spdlog/sinks/ringbuffer_sink.h"
#include "spdlog/spdlog.h"

namespace dmdserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

TEST(ListenerFailureTest, ReadsTheReasonOfGrpcsAcceptFailureLine) {
  EXPECT_EQ(ListenerFailure("Failed accept4: Too many open files"), "Too many open files");
  EXPECT_EQ(ListenerFailure("Failed accept4: "), "");
  EXPECT_EQ(ListenerFailure("Failed to add port"), "");
  EXPECT_EQ(ListenerFailure("Accept4 failed: Too many open files"), "");
}

// Installs the route once for the whole test program (gRPC keeps one log function) and records
// what reaches spdlog and the callback.
class GrpcLogTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    sink_ = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(64);
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("test", sink_));
    RouteGrpcLogsToSpdlog([](const std::string& reason) { reasons_->push_back(reason); });
    grpc_init();  // gpr_log drops everything until gRPC has read its verbosity
  }

  static std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink_;
  static std::vector<std::string>* reasons_;
};

std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> GrpcLogTest::sink_;
std::vector<std::string>* GrpcLogTest::reasons_ = new std::vector<std::string>;

TEST_F(GrpcLogTest, GrpcErrorsGoToSpdlogAndAFailedListenerIsReportedOnce) {
  gpr_log(GPR_ERROR, "some transport error %d", 7);
  EXPECT_THAT(sink_->last_formatted(1).at(0), HasSubstr("grpc grpc_log_test.cc:"));
  EXPECT_THAT(sink_->last_formatted(1).at(0), HasSubstr("some transport error 7"));
  EXPECT_THAT(*reasons_, IsEmpty());

  gpr_log(GPR_ERROR, "Failed accept4: %s", "Too many open files");
  gpr_log(GPR_ERROR, "Failed accept4: %s", "Too many open files");
  EXPECT_THAT(*reasons_, ElementsAre("Too many open files"));
  EXPECT_THAT(sink_->last_formatted(1).at(0), HasSubstr("Failed accept4: Too many open files"));
}

}  // namespace
}  // namespace dmdserve
