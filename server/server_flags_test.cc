#include "server/server_flags.h"

#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/reflection.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmdserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// Each test parses its own command line; the saver restores every flag (values and whether the
// command line set them) afterwards.
class ServerFlagsTest : public ::testing::Test {
 protected:
  // Parses `flags` as dmdserve's command line (after the environment, as main does).
  std::vector<std::string> Parse(std::vector<std::string> flags) {
    std::vector<std::string> args = {"dmdserve"};
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    return ParseServerFlags(static_cast<int>(argv.size()), argv.data());
  }

  absl::StatusOr<DmdServer::Options> Options(std::vector<std::string> flags) {
    Parse(std::move(flags));
    warnings_.clear();
    return OptionsFromFlags(&warnings_);
  }

  absl::FlagSaver saver_;
  std::vector<std::string> warnings_;
};

TEST_F(ServerFlagsTest, DefaultsMatchTheDocumentedOnes) {
  absl::StatusOr<DmdServer::Options> options = Options({});
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_THAT(warnings_, IsEmpty());
  EXPECT_EQ(options->listen_host, "0.0.0.0");
  EXPECT_EQ(options->port, 50051);
  EXPECT_EQ(options->metrics_port, 9464);
  EXPECT_TRUE(options->reflection);
  EXPECT_EQ(options->max_receive_message_bytes, 4 << 20);
  EXPECT_EQ(options->max_send_message_bytes, 256 << 20);
  EXPECT_EQ(options->drain_grace, absl::Seconds(30));
  EXPECT_EQ(options->limits.max_prompt_bytes, 4096);
  EXPECT_EQ(options->limits.max_images_per_request, RequestLimits().max_images_per_request);
  EXPECT_EQ(options->version, "");
  const Engine::Options& e = options->engine;
  EXPECT_THAT(e.model_dirs, ElementsAre("models/fashion-dmd", "models/fashion-teacher"));
  EXPECT_EQ(e.default_model, "");
  EXPECT_THAT(e.devices, ElementsAre("cpu"));
  EXPECT_EQ(e.instances_per_device, 0);  // derived by the engine
  EXPECT_TRUE(e.cuda_graphs);
  EXPECT_EQ(e.dtype, "");
  EXPECT_EQ(e.postprocess, "torch");
  EXPECT_EQ(e.intra_op_threads, 0);
  EXPECT_TRUE(e.tune_malloc);
  EXPECT_TRUE(e.channels_last_decoder);
  EXPECT_TRUE(e.jit_optimize);
  EXPECT_EQ(e.max_batch_size, 0);
  EXPECT_EQ(e.batch_tuning_time, absl::Milliseconds(250));
  EXPECT_EQ(e.max_queue_delay, absl::ZeroDuration());
  EXPECT_EQ(e.max_queued_images, 256);
  EXPECT_THAT(e.allowed_batch_sizes, IsEmpty());
  EXPECT_EQ(e.max_images_per_request, 0);
  EXPECT_EQ(e.warmup_runs, 2);
  EXPECT_EQ(e.encode_threads, 2);
  EXPECT_EQ(e.png_compression_level, 1);
}

TEST_F(ServerFlagsTest, FlagsReachTheirOptions) {
  absl::StatusOr<DmdServer::Options> options = Options(
      {"--listen_host=127.0.0.1", "--port=0", "--metrics_port=0", "--reflection=false",
       "--drain_grace_s=5", "--max_prompt_bytes=10", "--max_images_per_request=3",
       "--model_dirs=a,b,c", "--default_model=b", "--device=cuda:1", "--instances_per_device=3",
       "--cuda_graphs=false", "--dtype=float16", "--postprocess=cuda_kernel",
       "--max_queue_delay_us=250", "--allowed_batch_sizes=1,2,4", "--warmup_runs=1",
       "--malloc_tuning=false", "--channels_last_decoder=false", "--intra_op_threads=5",
       "--max_batch_size=4", "--batch_tuning_ms=40"});
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_THAT(warnings_, IsEmpty());
  EXPECT_EQ(options->listen_host, "127.0.0.1");
  EXPECT_EQ(options->port, 0);
  EXPECT_EQ(options->metrics_port, 0);
  EXPECT_FALSE(options->reflection);
  EXPECT_EQ(options->drain_grace, absl::Seconds(5));
  EXPECT_EQ(options->limits.max_prompt_bytes, 10);
  EXPECT_EQ(options->limits.max_images_per_request, 3);
  const Engine::Options& e = options->engine;
  EXPECT_THAT(e.model_dirs, ElementsAre("a", "b", "c"));
  EXPECT_EQ(e.default_model, "b");
  EXPECT_THAT(e.devices, ElementsAre("cuda:1"));
  EXPECT_EQ(e.instances_per_device, 3);
  EXPECT_FALSE(e.cuda_graphs);
  EXPECT_EQ(e.dtype, "float16");
  EXPECT_EQ(e.postprocess, "cuda_kernel");
  EXPECT_EQ(e.max_queue_delay, absl::Microseconds(250));
  EXPECT_THAT(e.allowed_batch_sizes, ElementsAre(1, 2, 4));
  EXPECT_EQ(e.max_images_per_request, 3);
  EXPECT_EQ(e.warmup_runs, 1);
  EXPECT_FALSE(e.tune_malloc);
  EXPECT_FALSE(e.channels_last_decoder);
  EXPECT_EQ(e.intra_op_threads, 5);
  EXPECT_EQ(e.max_batch_size, 4);
  EXPECT_EQ(e.batch_tuning_time, absl::Milliseconds(40));
}

TEST_F(ServerFlagsTest, DevicesWinOverDevice) {
  absl::StatusOr<DmdServer::Options> options = Options({"--device=cuda:1", "--devices=0,1"});
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_THAT(options->engine.devices, ElementsAre("0", "1"));
}

TEST_F(ServerFlagsTest, BadBatchSizeNamesTheFlag) {
  absl::StatusOr<DmdServer::Options> options = Options({"--allowed_batch_sizes=1,two"});
  EXPECT_EQ(options.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(options.status().message(), "--allowed_batch_sizes: 'two' is not an integer");
}

TEST_F(ServerFlagsTest, NegativeInstancesPerDeviceNamesTheFlag) {
  absl::StatusOr<DmdServer::Options> options = Options({"--instances_per_device=-1"});
  EXPECT_EQ(options.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(options.status().message(), HasSubstr("--instances_per_device must be >= 0"));
  // 0 asks the engine to derive the count from the CPU budget.
  options = Options({"--instances_per_device=0"});
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->engine.instances_per_device, 0);
}

TEST_F(ServerFlagsTest, DeprecatedWorkersStillSetsInstancesWithAWarning) {
  absl::StatusOr<DmdServer::Options> options = Options({"--workers=3"});
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->engine.instances_per_device, 3);
  ASSERT_EQ(warnings_.size(), 1u);
  EXPECT_THAT(warnings_[0], HasSubstr("--workers is deprecated"));
  EXPECT_THAT(warnings_[0], HasSubstr("--instances_per_device=3"));
}

TEST_F(ServerFlagsTest, WorkersIsPassedOnUncheckedForTheEngine) {
  // 0 now means "derived", like --instances_per_device=0; negative values fail in Engine::Create.
  absl::StatusOr<DmdServer::Options> options = Options({"--workers=0"});
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->engine.instances_per_device, 0);
}

TEST_F(ServerFlagsTest, InstancesPerDeviceWinsOverWorkersWithAWarning) {
  absl::StatusOr<DmdServer::Options> options = Options({"--workers=3", "--instances_per_device=2"});
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->engine.instances_per_device, 2);
  ASSERT_EQ(warnings_.size(), 1u);
  EXPECT_THAT(warnings_[0], HasSubstr("--workers is deprecated and ignored"));
  EXPECT_THAT(warnings_[0], HasSubstr("--instances_per_device=2"));
}

TEST_F(ServerFlagsTest, EnvironmentSetsFlagsAndTheCommandLineWins) {
  setenv("DMDSERVE_MAX_PROMPT_BYTES", "10", 1);
  setenv("DMDSERVE_PORT", "1234", 1);
  setenv("DMDSERVE_WORKERS", "2", 1);
  absl::StatusOr<DmdServer::Options> options = Options({"--port=99"});
  unsetenv("DMDSERVE_MAX_PROMPT_BYTES");
  unsetenv("DMDSERVE_PORT");
  unsetenv("DMDSERVE_WORKERS");
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->limits.max_prompt_bytes, 10);
  EXPECT_EQ(options->port, 99);
  // A flag set from the environment counts as given: the deprecation applies to it too.
  EXPECT_EQ(options->engine.instances_per_device, 2);
  EXPECT_EQ(warnings_.size(), 1u);
}

TEST_F(ServerFlagsTest, PositionalArgumentsAreReturned) {
  EXPECT_THAT(Parse({"--port=1", "extra"}), ElementsAre("dmdserve", "extra"));
}

TEST_F(ServerFlagsTest, LoggingDefaultsToTextAtInfo) {
  Parse({});
  absl::StatusOr<LoggingOptions> logging = LoggingOptionsFromFlags();
  ASSERT_TRUE(logging.ok()) << logging.status();
  EXPECT_FALSE(logging->json);
  EXPECT_EQ(logging->level, spdlog::level::info);
}

TEST_F(ServerFlagsTest, LoggingFlagsAreConverted) {
  Parse({"--log_format=json", "--log_level=warn"});
  absl::StatusOr<LoggingOptions> logging = LoggingOptionsFromFlags();
  ASSERT_TRUE(logging.ok()) << logging.status();
  EXPECT_TRUE(logging->json);
  EXPECT_EQ(logging->level, spdlog::level::warn);
  Parse({"--log_level=off"});
  ASSERT_TRUE(LoggingOptionsFromFlags().ok());
  EXPECT_EQ(LoggingOptionsFromFlags()->level, spdlog::level::off);
}

TEST_F(ServerFlagsTest, BadLogFormatNamesTheFlag) {
  Parse({"--log_format=xml"});
  absl::StatusOr<LoggingOptions> logging = LoggingOptionsFromFlags();
  EXPECT_EQ(logging.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(logging.status().message(), "--log_format must be text or json, got 'xml'");
}

TEST_F(ServerFlagsTest, BadLogLevelNamesTheFlag) {
  Parse({"--log_level=loud"});
  absl::StatusOr<LoggingOptions> logging = LoggingOptionsFromFlags();
  EXPECT_EQ(logging.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(logging.status().message(),
            "--log_level must be trace, debug, info, warn, error or off, got 'loud'");
}

}  // namespace
}  // namespace dmdserve
