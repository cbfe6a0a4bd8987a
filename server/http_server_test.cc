#include "server/http_server.h"

#include <curl/curl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/fake_backend_testing.h"
#include "server/metrics.h"
#include "server/metrics_testing.h"
#include "server/socket_testing.h"
#include "spdlog/spdlog.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;
using ::testing::NiceMock;
using ::testing::Return;

// One HTTP exchange as libcurl saw it.
struct Reply {
  CURLcode curl = CURLE_OK;
  long status = 0;
  std::string body;
  std::string headers;  // the header block as received
};

size_t WriteBody(char* data, size_t size, size_t count, void* body) {
  static_cast<std::string*>(body)->append(data, size * count);
  return size * count;
}

size_t WriteHeader(char* data, size_t size, size_t count, void* headers) {
  static_cast<std::string*>(headers)->append(data, size * count);
  return size * count;
}

std::string RawPost(const std::string& path, const std::string& body) {
  return absl::StrCat("POST ", path, " HTTP/1.1\r\nHost: localhost\r\n",
                      "Content-Type: application/json\r\nContent-Length: ", body.size(),
                      "\r\n\r\n", body);
}

// The HttpApiServer on a loopback port in front of a mock backend whose Submit hands requests
// to a ThreadedProducer (so callbacks arrive from other threads, as the engine's do), and
// libcurl as the client.
class HttpServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { ASSERT_EQ(curl_global_init(CURL_GLOBAL_DEFAULT), CURLE_OK); }
  static void TearDownTestSuite() { curl_global_cleanup(); }

  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);  // no line per request
    absl::StatusOr<std::unique_ptr<Metrics>> metrics =
        Metrics::Create({.models = {"tiny"}, .devices = {"cpu"}});
    ASSERT_TRUE(metrics.ok()) << metrics.status();
    metrics_ = *std::move(metrics);
    ON_CALL(backend_, ResolveModel).WillByDefault([](std::string_view name) {
      return name.empty() ? std::string("tiny") : std::string(name);
    });
    absl::StatusOr<std::unique_ptr<HttpApiServer>> server = HttpApiServer::Create(
        {.host = "127.0.0.1", .port = 0}, &backend_, metrics_.get(), /*keys=*/nullptr);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }

  // The producer's threads call into the server: they end before it is destroyed.
  void TearDown() override {
    producer_.JoinAll();
    server_.reset();
  }

  // Makes the backend accept the next `times` requests and serve each per `script`.
  void ExpectSubmit(Script script, int times = 1) {
    EXPECT_CALL(backend_, Submit)
        .Times(times)
        .WillRepeatedly([this, script](GenerateParams params, GenerateCallbacks callbacks) {
          return producer_.Start(std::move(params), std::move(callbacks), script);
        });
  }

  Reply Post(const std::string& path, const std::string& body) {
    Reply reply;
    CURL* curl = curl_easy_init();
    if (curl == nullptr) {
      reply.curl = CURLE_FAILED_INIT;
      return reply;
    }
    const std::string url = absl::StrCat("http://127.0.0.1:", server_->port(), path);
    curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.c_str());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, static_cast<long>(body.size()));
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &WriteBody);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &reply.body);
    curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, &WriteHeader);
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, &reply.headers);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, static_cast<long>(absl::ToInt64Milliseconds(kWait)));
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_NOPROXY, "*");  // never a proxy from the environment
    reply.curl = curl_easy_perform(curl);
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &reply.status);
    curl_slist_free_all(headers);
    curl_easy_cleanup(curl);
    return reply;
  }

  double Requests(RpcMethod method, const std::string& code) {
    return MetricSum(*metrics_, "dmdserve_requests_total",
                     {{"method", std::string(RpcMethodName(method))}, {"code", code}});
  }

  // Waits (up to kWait) until `method` has counted a request with `code`.
  bool WaitForCount(RpcMethod method, const std::string& code) {
    const absl::Time give_up = absl::Now() + kWait;
    while (Requests(method, code) == 0 && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(5));
    }
    return Requests(method, code) > 0;
  }

  static std::string GenerateBody(int num_images, const std::string& prompt = "a photo of a cat") {
    return nlohmann::json{{"prompt", prompt}, {"num_images", num_images}}.dump();
  }

  ThreadedProducer producer_;
  NiceMock<MockBackend> backend_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<HttpApiServer> server_;
};

// The body's NDJSON lines, parsed.
std::vector<nlohmann::json> Lines(const std::string& body) {
  std::vector<nlohmann::json> lines;
  for (absl::string_view line : absl::StrSplit(body, '\n', absl::SkipEmpty())) {
    lines.push_back(nlohmann::json::parse(line));
  }
  return lines;
}

TEST_F(HttpServerTest, OpenAiGenerationIsAnsweredOnceTheBackendIsDone) {
  ExpectSubmit({.order = {1, 0}});
  const Reply reply = Post("/v1/images/generations",
                           R"({"prompt": "a photo of a cat", "n": 2, "size": "32x48"})");
  ASSERT_EQ(reply.curl, CURLE_OK) << curl_easy_strerror(reply.curl);
  ASSERT_EQ(reply.status, 200) << reply.body;
  const nlohmann::json json = nlohmann::json::parse(reply.body);
  ASSERT_EQ(json["data"].size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(json["data"][i]["b64_json"], absl::Base64Escape(absl::StrCat("image-", i)));
    EXPECT_EQ(json["data"][i]["seed"], kSeed + i);
  }
  ASSERT_EQ(producer_.params().size(), 1u);
  const GenerateParams params = producer_.params()[0];
  EXPECT_EQ(params.prompt, "a photo of a cat");
  EXPECT_EQ(params.num_images, 2);
  EXPECT_EQ(params.width, 32);
  EXPECT_EQ(params.height, 48);
  EXPECT_EQ(Requests(RpcMethod::kHttpImagesGenerations, "OK"), 1);
}

TEST_F(HttpServerTest, StreamSendsEachImageAsALineInTheOrderProduced) {
  ExpectSubmit({.order = {2, 0, 1}});
  const Reply reply = Post("/v1/generate:stream", GenerateBody(3));
  ASSERT_EQ(reply.curl, CURLE_OK) << curl_easy_strerror(reply.curl);
  ASSERT_EQ(reply.status, 200) << reply.body;
  EXPECT_THAT(reply.headers, HasSubstr("application/x-ndjson"));
  const std::vector<nlohmann::json> lines = Lines(reply.body);
  ASSERT_EQ(lines.size(), 3u) << reply.body;
  const int order[] = {2, 0, 1};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(lines[i].value("index", 0), order[i]) << lines[i];
    EXPECT_EQ(lines[i]["data"], absl::Base64Escape(absl::StrCat("image-", order[i])));
  }
  EXPECT_TRUE(WaitForCount(RpcMethod::kHttpGenerateStream, "OK"));
}

TEST_F(HttpServerTest, StreamFailingAfterItsFirstImageEndsWithAnErrorLine) {
  ExpectSubmit({.order = {0}, .final_status = absl::InternalError("the model failed")});
  const Reply reply = Post("/v1/generate:stream", GenerateBody(1));
  ASSERT_EQ(reply.curl, CURLE_OK) << curl_easy_strerror(reply.curl);
  EXPECT_EQ(reply.status, 200);  // sent with the first line: it cannot change any more
  const std::vector<nlohmann::json> lines = Lines(reply.body);
  ASSERT_EQ(lines.size(), 2u) << reply.body;
  EXPECT_TRUE(lines[0].contains("data"));
  EXPECT_EQ(lines[1]["error"]["status"], "INTERNAL") << lines[1];
  EXPECT_TRUE(WaitForCount(RpcMethod::kHttpGenerateStream, "INTERNAL"));
}

// A client that goes away is noticed when the stream next sends (the connection waits,
// suspended, between images): the images after that are never computed.
TEST_F(HttpServerTest, StreamWhoseClientGoesAwayIsCancelledBeforeItsOtherImages) {
  absl::Notification client_gone;
  ExpectSubmit({.order = {0, 1, 2, 3},
                .wait_for_cancel_after = 2,
                .resume = &client_gone,
                .pause_after = 1});
  const int fd = ConnectLoopback(server_->port(), kWait);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, RawPost("/v1/generate:stream", GenerateBody(4))));
  const std::string first = ReceiveUntil(fd, "}\n");
  EXPECT_THAT(first, HasSubstr("200 OK"));
  EXPECT_THAT(first, HasSubstr("\"data\""));
  const linger reset{.l_onoff = 1, .l_linger = 0};  // close with a reset: gone at once
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
  close(fd);
  client_gone.Notify();

  producer_.JoinAll();
  EXPECT_TRUE(producer_.saw_cancel());
  EXPECT_EQ(producer_.images_produced(), 2);
  EXPECT_TRUE(WaitForCount(RpcMethod::kHttpGenerateStream, "CANCELLED"));
  EXPECT_EQ(Requests(RpcMethod::kHttpGenerateStream, "OK"), 0);
  EXPECT_TRUE(server_->WaitIdle(kWait));
}

TEST_F(HttpServerTest, BackendAtCapacityGives429WithRetryAfter) {
  EXPECT_CALL(backend_, Submit)
      .WillOnce(Return(absl::ResourceExhaustedError("the queue of model tiny is full")));
  const Reply reply = Post("/v1/generate", GenerateBody(1));
  ASSERT_EQ(reply.curl, CURLE_OK) << curl_easy_strerror(reply.curl);
  EXPECT_EQ(reply.status, 429);
  EXPECT_THAT(reply.headers, HasSubstr("Retry-After: 1"));
  EXPECT_THAT(reply.body, HasSubstr("queue of model tiny is full"));
  EXPECT_EQ(Requests(RpcMethod::kHttpGenerate, "RESOURCE_EXHAUSTED"), 1);
}

TEST_F(HttpServerTest, DrainRefusesNewRequestsAndFinishesAcceptedOnes) {
  absl::Notification release;
  ExpectSubmit({.order = {0}, .hold_done = &release});
  Reply accepted;
  std::thread client([&] { accepted = Post("/v1/generate", GenerateBody(1)); });
  const absl::Time give_up = absl::Now() + kWait;
  while (producer_.params().empty() && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  if (producer_.params().size() != 1u) {  // a joinable thread must not outlive the test
    release.Notify();
    client.join();
    FAIL() << "the request never reached the backend";
  }

  server_->StartDrain();
  const Reply refused = Post("/v1/generate", GenerateBody(1));
  EXPECT_EQ(refused.status, 503);
  EXPECT_THAT(refused.headers, HasSubstr("Connection: close"));
  EXPECT_FALSE(server_->WaitIdle(absl::Milliseconds(50)));  // the accepted one is still out

  release.Notify();
  client.join();
  EXPECT_EQ(accepted.status, 200) << accepted.body;
  EXPECT_EQ(nlohmann::json::parse(accepted.body)["images"].size(), 1u);
  EXPECT_TRUE(server_->WaitIdle(kWait));
  EXPECT_EQ(Requests(RpcMethod::kHttpGenerate, "UNAVAILABLE"), 1);
  EXPECT_EQ(Requests(RpcMethod::kHttpGenerate, "OK"), 1);
}

// Requests answered on producer threads while others are read and suspended on the daemon's:
// each gets its own images (the sanitizer builds run this).
TEST_F(HttpServerTest, ConcurrentRequestsEachGetTheirOwnAnswer) {
  constexpr int kClients = 12;
  ExpectSubmit({.order = {1, 0}}, kClients);
  std::vector<Reply> replies(kClients);
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      const std::string path = i % 2 == 0 ? "/v1/generate" : "/v1/generate:stream";
      replies[i] = Post(path, GenerateBody(2, absl::StrCat("prompt ", i)));
    });
  }
  for (std::thread& t : clients) t.join();
  for (int i = 0; i < kClients; ++i) {
    ASSERT_EQ(replies[i].status, 200) << i << ": " << replies[i].body;
    if (i % 2 == 0) {
      EXPECT_EQ(nlohmann::json::parse(replies[i].body)["images"].size(), 2u) << i;
    } else {
      EXPECT_EQ(Lines(replies[i].body).size(), 2u) << i;
    }
  }
  EXPECT_TRUE(server_->WaitIdle(kWait));
  EXPECT_EQ(Requests(RpcMethod::kHttpGenerate, "OK"), kClients / 2);
  EXPECT_EQ(Requests(RpcMethod::kHttpGenerateStream, "OK"), kClients / 2);
}

// A connection holding half a request's headers takes a connection slot and nothing else.
TEST_F(HttpServerTest, StalledClientDelaysNoOtherRequest) {
  const int stalled = ConnectLoopback(server_->port(), kWait);
  ASSERT_GE(stalled, 0);
  ASSERT_TRUE(SendAll(stalled, "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Le"));

  ExpectSubmit({.order = {0}});
  const Reply reply = Post("/v1/generate", GenerateBody(1));
  close(stalled);
  ASSERT_EQ(reply.curl, CURLE_OK) << curl_easy_strerror(reply.curl);
  EXPECT_EQ(reply.status, 200) << reply.body;
}

}  // namespace
}  // namespace dmdserve
