#include "server/image_service.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/fake_backend_testing.h"
#include "server/generation_backend.h"
#include "server/metrics.h"
#include "server/metrics_testing.h"
#include "spdlog/spdlog.h"

namespace dmdserve {
namespace {

using ::testing::_;
using ::testing::DoubleEq;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::NiceMock;
using ::testing::Return;

// The service on a real gRPC server on a loopback port, a generated stub as its client, and a
// mock backend whose Submit hands requests to a ThreadedProducer.
class ImageServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);  // no line per RPC
    absl::StatusOr<std::unique_ptr<Metrics>> metrics =
        Metrics::Create({.models = {"tiny", "other"}, .devices = {"cpu"}});
    ASSERT_TRUE(metrics.ok()) << metrics.status();
    metrics_ = *std::move(metrics);
    ON_CALL(backend_, ResolveModel).WillByDefault([](std::string_view name) {
      return name.empty() ? std::string("tiny") : std::string(name);
    });
    service_ = std::make_unique<ImageGenerationService>(&backend_, metrics_.get(), limits_);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(port, 0);
    stub_ = v1::ImageGeneration::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }

  void TearDown() override {
    StopServer();
    producer_.JoinAll();
  }

  // Returns once every RPC has finished (a reactor that never finishes hangs here, and the test
  // times out), so the metrics are final afterwards.
  void StopServer() {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(10));
    server_->Wait();
    server_.reset();
  }

  // Makes the backend accept the next request and serve it per `script`.
  void ExpectSubmit(Script script) {
    EXPECT_CALL(backend_, Submit)
        .WillOnce([this, script](GenerateParams params, GenerateCallbacks callbacks) {
          return producer_.Start(std::move(params), std::move(callbacks), script);
        });
  }

  static void SetDeadline(grpc::ClientContext* context) {
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  }

  grpc::Status Generate(const v1::GenerateRequest& request, v1::GenerateResponse* response) {
    grpc::ClientContext context;
    SetDeadline(&context);
    return stub_->Generate(&context, request, response);
  }

  // Reads the whole stream into `images`.
  grpc::Status GenerateStream(const v1::GenerateRequest& request,
                              std::vector<v1::GeneratedImage>* images) {
    grpc::ClientContext context;
    SetDeadline(&context);
    auto reader = stub_->GenerateStream(&context, request);
    v1::GeneratedImage image;
    while (reader->Read(&image)) images->push_back(image);
    return reader->Finish();
  }

  double Metric(const std::string& family, const std::map<std::string, std::string>& labels) {
    return MetricSum(*metrics_, family, labels);
  }

  double Requests(const std::string& method, const std::string& code) {
    return Metric("dmdserve_requests_total", {{"method", method}, {"code", code}});
  }
  double AllRequests(const std::string& method) {
    return Metric("dmdserve_requests_total", {{"method", method}});
  }
  double InFlight() { return Metric("dmdserve_requests_in_flight", {}); }

  static v1::GenerateRequest Request(int num_images) {
    v1::GenerateRequest request;
    request.set_prompt("a photo of a cat");
    request.set_num_images(num_images);
    request.set_request_id("req-1");
    return request;
  }

  RequestLimits limits_;
  ThreadedProducer producer_;
  NiceMock<MockBackend> backend_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<ImageGenerationService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::ImageGeneration::Stub> stub_;
};

TEST_F(ImageServiceTest, GenerateConvertsParamsAndResult) {
  ExpectSubmit({.order = {1, 0}});
  v1::GenerateRequest request = Request(2);
  request.set_seed(kSeed);
  request.set_width(32);
  request.set_height(48);
  request.set_encoding(v1::IMAGE_ENCODING_RAW);
  const absl::Time sent = absl::Now();
  v1::GenerateResponse response;
  grpc::Status status = Generate(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();

  ASSERT_EQ(producer_.params().size(), 1u);
  const GenerateParams params = producer_.params()[0];
  EXPECT_EQ(params.model, "tiny");  // resolved from the empty name
  EXPECT_EQ(params.prompt, "a photo of a cat");
  EXPECT_EQ(params.num_images, 2);
  EXPECT_EQ(params.seed, kSeed);
  EXPECT_EQ(params.width, 32);
  EXPECT_EQ(params.height, 48);
  EXPECT_EQ(params.encoding, ImageEncoding::kRaw);
  EXPECT_EQ(params.request_id, "req-1");
  EXPECT_GT(params.deadline, sent);  // the client's 10 s deadline
  EXPECT_LE(params.deadline, sent + absl::Seconds(11));

  EXPECT_EQ(response.request_id(), "req-1");
  EXPECT_EQ(response.model(), "tiny");
  EXPECT_EQ(response.truncated_tokens(), 3);
  EXPECT_THAT(response.timings().queue_seconds(), DoubleEq(0.25));
  EXPECT_THAT(response.timings().text_encoder_seconds(), DoubleEq(0.01));
  EXPECT_THAT(response.timings().generator_seconds(), DoubleEq(0.02));
  EXPECT_THAT(response.timings().decoder_seconds(), DoubleEq(0.03));
  EXPECT_THAT(response.timings().encode_seconds(), DoubleEq(0.04));
  EXPECT_THAT(response.timings().total_seconds(), DoubleEq(0.5));
  EXPECT_EQ(response.timings().batch_size(), 2);
  ASSERT_EQ(response.images_size(), 2);
  for (int i = 0; i < 2; ++i) {
    const v1::GeneratedImage& image = response.images(i);
    EXPECT_EQ(image.index(), i);
    EXPECT_EQ(image.seed(), kSeed + i);
    EXPECT_EQ(image.width(), 32);
    EXPECT_EQ(image.height(), 48);
    EXPECT_EQ(image.channels(), 3);
    EXPECT_EQ(image.encoding(), v1::IMAGE_ENCODING_RAW);
    EXPECT_EQ(image.data(), absl::StrCat("image-", i));
  }
  EXPECT_EQ(Requests("Generate", "OK"), 1);
  EXPECT_EQ(Metric("dmdserve_images_generated_total", {{"model", "tiny"}}), 2);
  EXPECT_EQ(Metric("dmdserve_queue_wait_seconds", {{"model", "tiny"}}), 1);
  EXPECT_EQ(InFlight(), 0);
}

TEST_F(ImageServiceTest, GenerateMapsSubmitErrorToItsGrpcCode) {
  EXPECT_CALL(backend_, Submit)
      .WillOnce(Return(absl::ResourceExhaustedError("queue of tiny is full (256 images)")));
  v1::GenerateResponse response;
  grpc::Status status = Generate(Request(1), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(status.error_message(), "queue of tiny is full (256 images)");
  EXPECT_EQ(Requests("Generate", "RESOURCE_EXHAUSTED"), 1);
  EXPECT_EQ(InFlight(), 0);
}

TEST_F(ImageServiceTest, GenerateMapsFailureReportedLaterToItsGrpcCode) {
  ExpectSubmit({.order = {0, 1}, .final_status = absl::InternalError("model failed: boom")});
  v1::GenerateResponse response;
  grpc::Status status = Generate(Request(2), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_EQ(status.error_message(), "model failed: boom");
  EXPECT_EQ(response.images_size(), 0);
  EXPECT_EQ(Requests("Generate", "INTERNAL"), 1);
  EXPECT_EQ(Metric("dmdserve_images_generated_total", {}), 0);
  EXPECT_EQ(InFlight(), 0);
}

TEST_F(ImageServiceTest, UnknownModelIsNotFoundWithoutSubmitting) {
  EXPECT_CALL(backend_, ResolveModel(std::string_view("nope")))
      .WillRepeatedly(Return(absl::NotFoundError("model \"nope\" is not served; served: tiny")));
  EXPECT_CALL(backend_, Submit).Times(0);
  v1::GenerateRequest request = Request(1);
  request.set_model("nope");
  v1::GenerateResponse response;
  grpc::Status status = Generate(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(status.error_message(), "model \"nope\" is not served; served: tiny");
  std::vector<v1::GeneratedImage> images;
  status = GenerateStream(request, &images);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(images.empty());
  EXPECT_EQ(Metric("dmdserve_requests_total", {{"model", "_unknown"}, {"code", "NOT_FOUND"}}), 2);
}

TEST_F(ImageServiceTest, InvalidRequestsNameTheFieldAndNeverReachTheBackend) {
  EXPECT_CALL(backend_, ResolveModel).Times(0);
  EXPECT_CALL(backend_, Submit).Times(0);
  EXPECT_CALL(backend_, Tokenize).Times(0);

  v1::GenerateRequest no_prompt = Request(1);
  no_prompt.clear_prompt();
  v1::GenerateResponse response;
  grpc::Status status = Generate(no_prompt, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("prompt"));

  std::vector<v1::GeneratedImage> images;
  status = GenerateStream(Request(limits_.max_images_per_request + 1), &images);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("num_images"));
  EXPECT_TRUE(images.empty());

  v1::TokenizeRequest tokenize;
  tokenize.set_text(std::string(limits_.max_prompt_bytes + 1, 'a'));
  v1::TokenizeResponse tokens;
  grpc::ClientContext context;
  SetDeadline(&context);
  status = stub_->Tokenize(&context, tokenize, &tokens);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("text"));

  EXPECT_EQ(Requests("Generate", "INVALID_ARGUMENT"), 1);
  EXPECT_EQ(Requests("GenerateStream", "INVALID_ARGUMENT"), 1);
  EXPECT_EQ(Requests("Tokenize", "INVALID_ARGUMENT"), 1);
}

TEST_F(ImageServiceTest, GenerateStreamDeliversEachImageAsItIsProduced) {
  absl::Notification release_done;
  ExpectSubmit({.order = {2, 0, 3, 1}, .hold_done = &release_done});
  grpc::ClientContext context;
  SetDeadline(&context);
  auto reader = stub_->GenerateStream(&context, Request(4));
  // Every image arrives while the backend still holds on_done back: nothing waits for the end.
  std::vector<int> indexes;
  v1::GeneratedImage image;
  for (int i = 0; i < 4 && reader->Read(&image); ++i) {
    indexes.push_back(image.index());
    EXPECT_EQ(image.seed(), kSeed + image.index());
    EXPECT_EQ(image.data(), absl::StrCat("image-", image.index()));
    EXPECT_EQ(image.encoding(), v1::IMAGE_ENCODING_PNG);
    EXPECT_EQ(image.request_id(), "req-1");
    EXPECT_EQ(image.model(), "tiny");
    EXPECT_EQ(image.truncated_tokens(), 3);
    EXPECT_THAT(image.timings().queue_seconds(), DoubleEq(0.25));
  }
  EXPECT_THAT(indexes, ElementsAre(2, 0, 3, 1));
  EXPECT_EQ(producer_.done_calls(), 0);
  release_done.Notify();
  EXPECT_FALSE(reader->Read(&image));
  grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(Requests("GenerateStream", "OK"), 1);
  EXPECT_EQ(Metric("dmdserve_images_generated_total", {{"model", "tiny"}}), 4);
  EXPECT_EQ(InFlight(), 0);
}

TEST_F(ImageServiceTest, GenerateStreamSendsImagesThenTheLaterFailure) {
  ExpectSubmit(
      {.order = {1, 0}, .final_status = absl::ResourceExhaustedError("out of memory on cuda:0")});
  std::vector<v1::GeneratedImage> images;
  grpc::Status status = GenerateStream(Request(2), &images);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(status.error_message(), "out of memory on cuda:0");
  ASSERT_EQ(images.size(), 2u);
  EXPECT_EQ(images[0].index(), 1);
  EXPECT_EQ(images[1].index(), 0);
  EXPECT_EQ(Requests("GenerateStream", "RESOURCE_EXHAUSTED"), 1);
  EXPECT_EQ(InFlight(), 0);
}

TEST_F(ImageServiceTest, GenerateStreamMapsSubmitError) {
  EXPECT_CALL(backend_, Submit)
      .WillOnce(Return(absl::UnavailableError("the server is shutting down")));
  std::vector<v1::GeneratedImage> images;
  grpc::Status status = GenerateStream(Request(2), &images);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(status.error_message(), "the server is shutting down");
  EXPECT_TRUE(images.empty());
  EXPECT_EQ(InFlight(), 0);
}

TEST_F(ImageServiceTest, ClientCancellingMidStreamStopsTheBackendAndFinishesOnce) {
  ExpectSubmit({.order = {0, 1, 2, 3, 4}, .wait_for_cancel_after = 1, .honour_cancel = true});
  {
    grpc::ClientContext context;
    SetDeadline(&context);
    auto reader = stub_->GenerateStream(&context, Request(5));
    v1::GeneratedImage image;
    ASSERT_TRUE(reader->Read(&image));
    EXPECT_EQ(image.index(), 0);
    context.TryCancel();
    while (reader->Read(&image)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  StopServer();  // waits for the reactor to finish
  EXPECT_TRUE(producer_.saw_cancel());
  EXPECT_EQ(producer_.images_produced(), 1);
  EXPECT_EQ(producer_.done_calls(), 1);
  EXPECT_EQ(Requests("GenerateStream", "CANCELLED"), 1);
  EXPECT_EQ(AllRequests("GenerateStream"), 1);
  EXPECT_EQ(InFlight(), 0);
}

TEST_F(ImageServiceTest, FailedWritesWhileTheBackendKeepsProducingFinishOnceAsCancelled) {
  // The backend ignores the cancellation and hands over four more images after the client has
  // gone: their writes fail, and the reactor must drop them and finish exactly once.
  ExpectSubmit({.order = {0, 1, 2, 3, 4}, .wait_for_cancel_after = 1, .honour_cancel = false});
  {
    grpc::ClientContext context;
    SetDeadline(&context);
    auto reader = stub_->GenerateStream(&context, Request(5));
    v1::GeneratedImage image;
    ASSERT_TRUE(reader->Read(&image));
    EXPECT_EQ(image.index(), 0);
  }  // the client goes away without finishing the call
  StopServer();
  EXPECT_TRUE(producer_.saw_cancel());
  EXPECT_EQ(producer_.images_produced(), 5);
  EXPECT_EQ(producer_.done_calls(), 1);
  EXPECT_EQ(Requests("GenerateStream", "CANCELLED"), 1);
  EXPECT_EQ(AllRequests("GenerateStream"), 1);
  EXPECT_EQ(Metric("dmdserve_images_generated_total", {}), 0);
  EXPECT_EQ(InFlight(), 0);
}

TEST_F(ImageServiceTest, ConcurrentStreamsAllComplete) {
  constexpr int kStreams = 8;
  EXPECT_CALL(backend_, Submit)
      .Times(kStreams)
      .WillRepeatedly([this](GenerateParams params, GenerateCallbacks callbacks) {
        return producer_.Start(std::move(params), std::move(callbacks), {.order = {3, 1, 2, 0}});
      });
  std::vector<std::thread> clients;
  std::vector<grpc::Status> statuses(kStreams);
  std::vector<std::vector<v1::GeneratedImage>> images(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    clients.emplace_back([&, i] { statuses[i] = GenerateStream(Request(4), &images[i]); });
  }
  for (std::thread& t : clients) t.join();
  for (int i = 0; i < kStreams; ++i) {
    EXPECT_TRUE(statuses[i].ok()) << statuses[i].error_message();
    EXPECT_EQ(images[i].size(), 4u);
  }
  EXPECT_EQ(Requests("GenerateStream", "OK"), kStreams);
  EXPECT_EQ(Metric("dmdserve_images_generated_total", {}), 4 * kStreams);
  EXPECT_EQ(InFlight(), 0);
}

TEST_F(ImageServiceTest, ListModelsConvertsEveryField) {
  ModelInfo tiny{.name = "tiny",
                 .description = "a tiny random model",
                 .width = 32,
                 .height = 32,
                 .channels = 3,
                 .steps = 1,
                 .is_default = true,
                 .max_images_per_request = 16,
                 .ready = true,
                 .supported_sizes = {{32, 32}, {64, 48}},
                 .max_tokens = 77,
                 .batching = {{.device = "cpu",
                               .max_batch_size = 2,
                               .measured = {{1, 100.5}, {2, 180}, {4, 181}}},
                              {.device = "cuda:0", .max_batch_size = 8}}};
  EXPECT_CALL(backend_, ListModels)
      .WillOnce(Return(std::vector<ModelInfo>{tiny, ModelInfo{.name = "other"}}));
  grpc::ClientContext context;
  SetDeadline(&context);
  v1::ListModelsResponse response;
  grpc::Status status = stub_->ListModels(&context, v1::ListModelsRequest(), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.models_size(), 2);
  const v1::ModelInfo& m = response.models(0);
  EXPECT_EQ(m.name(), "tiny");
  EXPECT_EQ(m.description(), "a tiny random model");
  EXPECT_EQ(m.width(), 32);
  EXPECT_EQ(m.height(), 32);
  EXPECT_EQ(m.channels(), 3);
  EXPECT_EQ(m.steps(), 1);
  EXPECT_TRUE(m.is_default());
  EXPECT_EQ(m.max_images_per_request(), 16);
  EXPECT_TRUE(m.ready());
  EXPECT_EQ(m.max_tokens(), 77);
  ASSERT_EQ(m.supported_sizes_size(), 2);
  EXPECT_EQ(m.supported_sizes(1).width(), 64);
  EXPECT_EQ(m.supported_sizes(1).height(), 48);
  ASSERT_EQ(m.batching_size(), 2);
  EXPECT_EQ(m.batching(0).device(), "cpu");
  EXPECT_EQ(m.batching(0).max_batch_size(), 2);
  ASSERT_EQ(m.batching(0).measured_size(), 3);
  EXPECT_EQ(m.batching(0).measured(0).batch_size(), 1);
  EXPECT_DOUBLE_EQ(m.batching(0).measured(0).images_per_second(), 100.5);
  EXPECT_EQ(m.batching(0).measured(2).batch_size(), 4);
  EXPECT_EQ(m.batching(1).device(), "cuda:0");
  EXPECT_EQ(m.batching(1).max_batch_size(), 8);
  EXPECT_EQ(m.batching(1).measured_size(), 0);
  EXPECT_EQ(response.models(1).name(), "other");
  EXPECT_FALSE(response.models(1).is_default());
  EXPECT_EQ(Requests("ListModels", "OK"), 1);
}

TEST_F(ImageServiceTest, TokenizePassesThroughResultAndErrors) {
  EXPECT_CALL(backend_, Tokenize(std::string_view("other"), std::string_view("a cat")))
      .WillOnce(Return(TokenizeResult{.model = "other",
                                      .ids = {320, 2368},
                                      .tokens = {"a</w>", "cat</w>"},
                                      .input_ids = {49406, 320, 2368, 49407},
                                      .truncated_tokens = 1}));
  EXPECT_CALL(backend_, Tokenize(std::string_view("nope"), _))
      .WillOnce(Return(absl::NotFoundError("model \"nope\" is not served")));
  v1::TokenizeRequest request;
  request.set_model("other");
  request.set_text("a cat");
  v1::TokenizeResponse response;
  grpc::ClientContext context;
  SetDeadline(&context);
  grpc::Status status = stub_->Tokenize(&context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.model(), "other");
  EXPECT_THAT(response.ids(), ElementsAre(320, 2368));
  EXPECT_THAT(response.tokens(), ElementsAre("a</w>", "cat</w>"));
  EXPECT_THAT(response.input_ids(), ElementsAre(49406, 320, 2368, 49407));
  EXPECT_EQ(response.truncated_tokens(), 1);

  request.set_model("nope");
  grpc::ClientContext context2;
  SetDeadline(&context2);
  status = stub_->Tokenize(&context2, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(status.error_message(), "model \"nope\" is not served");
  EXPECT_EQ(Requests("Tokenize", "OK"), 1);
  EXPECT_EQ(Requests("Tokenize", "NOT_FOUND"), 1);
}

}  // namespace
}  // namespace dmdserve
