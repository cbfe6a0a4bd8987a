#include "server/metrics.h"

#include <prometheus/text_serializer.h>

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string Scrape(const Metrics& m) {
  return prometheus::TextSerializer().Serialize(m.registry()->Collect());
}

TEST(MetricsTest, CountsRequestsByModelMethodAndCode) {
  auto m = Metrics::Create({.models = {"tiny"}, .version = "1.2.3"});
  ASSERT_TRUE(m.ok());
  (*m)->RecordRequest(RpcMethod::kGenerate, "tiny", grpc::StatusCode::OK, absl::Milliseconds(30),
                      4);
  (*m)->RecordRequest(RpcMethod::kGenerate, "tiny", grpc::StatusCode::RESOURCE_EXHAUSTED,
                      absl::ZeroDuration(), 0);
  (*m)->RecordRequest(RpcMethod::kGenerate, "nope", grpc::StatusCode::NOT_FOUND,
                      absl::ZeroDuration(), 0);
  const std::string text = Scrape(**m);
  EXPECT_THAT(text,
              HasSubstr(R"(dmdserve_requests_total{code="OK",method="Generate",model="tiny"} 1)"));
  EXPECT_THAT(
      text,
      HasSubstr(
          R"(dmdserve_requests_total{code="RESOURCE_EXHAUSTED",method="Generate",model="tiny"} 1)"));
  // Names that are not served models never become label values.
  EXPECT_THAT(
      text,
      HasSubstr(
          R"(dmdserve_requests_total{code="NOT_FOUND",method="Generate",model="_unknown"} 1)"));
  EXPECT_THAT(text, Not(HasSubstr("nope")));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_images_generated_total{model="tiny"} 4)"));
  EXPECT_THAT(
      text,
      HasSubstr(R"(dmdserve_request_duration_seconds_count{method="Generate",model="tiny"} 1)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_build_info{version="1.2.3"} 1)"));
}

TEST(MetricsTest, RecordsEngineEvents) {
  auto m = Metrics::Create({.models = {"tiny"}, .queue_capacity_images = 64});
  ASSERT_TRUE(m.ok());
  (*m)->OnBatchDone({.model = "tiny",
                     .images = 3,
                     .padded_size = 4,
                     .text_encoder = absl::Milliseconds(1),
                     .generator = absl::Milliseconds(2),
                     .decoder = absl::Milliseconds(3),
                     .ok = true});
  (*m)->OnBatchDone({.model = "tiny", .images = 2, .ok = false});
  (*m)->OnImageEncoded("tiny", absl::Microseconds(300));
  (*m)->OnQueueDepth("tiny", 17);
  (*m)->OnModelReady("tiny", true);
  (*m)->AddInFlight("tiny", 2);
  const std::string text = Scrape(**m);
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_batch_size_images_sum{model="tiny"} 3)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_batches_total{model="tiny",result="ok"} 1)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_batches_total{model="tiny",result="error"} 1)"));
  EXPECT_THAT(
      text,
      HasSubstr(R"(dmdserve_stage_duration_seconds_count{model="tiny",stage="generator"} 1)"));
  EXPECT_THAT(
      text,
      HasSubstr(R"(dmdserve_stage_duration_seconds_count{model="tiny",stage="png_encode"} 1)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_queue_depth_images{model="tiny"} 17)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_queue_capacity_images{model="tiny"} 64)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_model_ready{model="tiny"} 1)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_requests_in_flight{model="tiny"} 2)"));
  EXPECT_THAT(text, Not(HasSubstr(R"(dmdserve_model_ready{model="_unknown"})")));
}

TEST(MetricsTest, CudaGraphBatchesHaveADurationButNoStageTimes) {
  auto m = Metrics::Create({.models = {"tiny"}});
  ASSERT_TRUE(m.ok());
  (*m)->OnBatchDone({.model = "tiny",
                     .images = 4,
                     .padded_size = 4,
                     .generator = absl::Milliseconds(2),
                     .ok = true,
                     .total = absl::Milliseconds(5)});
  (*m)->OnBatchDone({.model = "tiny",
                     .images = 3,
                     .padded_size = 4,
                     .ok = true,
                     .total = absl::Milliseconds(4),
                     .cuda_graph = true});
  const std::string text = Scrape(**m);
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_batch_duration_seconds_count{model="tiny"} 2)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_batch_duration_seconds_sum{model="tiny"} 0.009)"));
  EXPECT_THAT(
      text,
      HasSubstr(R"(dmdserve_stage_duration_seconds_count{model="tiny",stage="generator"} 1)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_batch_size_images_sum{model="tiny"} 7)"));
}

TEST(MetricsTest, RecordsDeviceBusyTimeAndGpuMemoryByDevice) {
  auto m = Metrics::Create({.models = {"tiny"}, .devices = {"cpu", "cuda:0"}});
  ASSERT_TRUE(m.ok());
  (*m)->OnDeviceStats({.device = "cpu", .busy = absl::Milliseconds(1500)});
  (*m)->OnDeviceStats({.device = "cpu", .busy = absl::Milliseconds(500)});
  (*m)->OnDeviceStats({.device = "cuda:0",
                       .busy = absl::Milliseconds(250),
                       .memory_used_bytes = 3000,
                       .memory_total_bytes = 8000});
  (*m)->OnDeviceStats({.device = "cuda:7", .busy = absl::Seconds(9)});  // not served: ignored
  const std::string text = Scrape(**m);
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_device_busy_seconds_total{device="cpu"} 2)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_device_busy_seconds_total{device="cuda:0"} 0.25)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_gpu_memory_used_bytes{device="cuda:0"} 3000)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_gpu_memory_total_bytes{device="cuda:0"} 8000)"));
  EXPECT_THAT(text, Not(HasSubstr(R"(dmdserve_gpu_memory_used_bytes{device="cpu"})")));
  EXPECT_THAT(text, Not(HasSubstr("cuda:7")));
}

TEST(MetricsTest, ChosenBatchSizePerModelAndDevice) {
  auto m = Metrics::Create({.models = {"a", "b"}, .devices = {"cpu", "cuda:0"}});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_THAT(Scrape(**m),
              HasSubstr(R"(dmdserve_max_batch_size_images{device="cuda:0",model="b"} 0)"));
  (*m)->OnBatchSizeChosen("a", "cpu", 4);
  (*m)->OnBatchSizeChosen("b", "cuda:0", 16);
  (*m)->OnBatchSizeChosen("b", "cuda:9", 32);  // not served: ignored
  (*m)->OnBatchSizeChosen("zzz", "cpu", 2);    // not served: ignored
  const std::string text = Scrape(**m);
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_max_batch_size_images{device="cpu",model="a"} 4)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_max_batch_size_images{device="cuda:0",model="b"} 16)"));
  EXPECT_THAT(text, HasSubstr(R"(dmdserve_max_batch_size_images{device="cpu",model="b"} 0)"));
  EXPECT_THAT(text, Not(HasSubstr("cuda:9")));
  EXPECT_THAT(text, Not(HasSubstr(R"(model="zzz")")));
}

TEST(MetricsTest, NeedsAModel) { EXPECT_FALSE(Metrics::Create({}).ok()); }

}  // namespace
}  // namespace dmdserve
