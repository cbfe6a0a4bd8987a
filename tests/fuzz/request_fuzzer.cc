// libFuzzer target for the request path: wire bytes -> gRPC -> ImageGenerationService (parse,
// authentication, validation, rate limit) -> FakeEngine -> response bytes, with metrics.
//
// The real service runs in-process behind a real grpc::Server; each input becomes one RPC sent as
// raw bytes over an in-process channel (request_input.h gives the layout: which RPC, which
// credentials, the request bytes). Invariants checked per input (a violation aborts, which
// libFuzzer reports as a crash):
// - every RPC ends, with a status from the documented set; every non-OK status has a message;
// - bytes that protobuf does not parse as the RPC's message get INVALID_ARGUMENT saying so;
// - a parseable request without a valid key gets UNAUTHENTICATED, with a valid key never does;
// - INVALID_ARGUMENT names a field of the request; requests that break a limit are never OK;
// - an OK Generate / GenerateStream returns exactly the images asked for, as the engine made them;
//   an OK Tokenize returns the tokenizer's ids;
// - the engine only ever sees requests that satisfy validation's contract (fake_engine.h) and
//   every request it accepted is finished;
// - dmdserve_requests_total counts every RPC exactly once.
// ASan and UBSan (CMakeLists.txt) catch memory and undefined-behaviour errors on the way.
#include <google/protobuf/stubs/logging.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <openssl/sha.h>
#include <prometheus/registry.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "server/api_keys.h"
#include "server/image_service.h"
#include "server/metrics.h"
#include "spdlog/spdlog.h"
#include "tests/fuzz/fake_engine.h"
#include "tests/fuzz/request_input.h"

namespace dmdserve::fuzz {
namespace {

constexpr char kOpenSecret[] = "fuzz-open-secret";
constexpr char kLimitedSecret[] = "fuzz-limited-secret";
constexpr char kService[] = "/dmdserve.v1.ImageGeneration/";

// The in-process server and its client, built once per fuzzing process.
struct Harness {
  std::unique_ptr<ClipTokenizer> tokenizer;
  RequestLimits limits;
  std::unique_ptr<FakeEngine> engine;
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<ApiKeys> keys;
  std::unique_ptr<ImageGenerationService> service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<grpc::GenericStub> stub;
  grpc::CompletionQueue cq;  // the client's; one call at a time
  int64_t rpcs = 0;          // RPCs sent so far
};

template <typename T>
T Must(absl::StatusOr<T> value) {
  if (!value.ok()) {
    std::fprintf(stderr, "request_fuzzer set-up: %s\n", value.status().ToString().c_str());
    std::abort();
  }
  return *std::move(value);
}

std::string Sha256Hex(const std::string& secret) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(secret.data()), secret.size(), digest);
  std::string hex;
  for (unsigned char b : digest) absl::StrAppend(&hex, absl::Hex(b, absl::kZeroPad2));
  return hex;
}

// A keys file with a key without a limit and one limited to 5 images/s (a burst of 10).
std::string WriteKeysFile() {
  char path[] = "/tmp/request_fuzzer_keys.XXXXXX";
  const int fd = mkstemp(path);
  FUZZ_CHECK(fd >= 0);
  close(fd);
  std::ofstream(path) << "# NAME SHA256HEX [IMAGES_PER_SECOND]\n"
                      << "open " << Sha256Hex(kOpenSecret) << "\n"
                      << "limited " << Sha256Hex(kLimitedSecret) << " 5\n";
  return path;
}

Harness* Create() {
  google::protobuf::SetLogHandler(nullptr);  // parse failures are expected, not news
  spdlog::set_level(spdlog::level::off);     // the service logs one line per RPC
  auto* h = new Harness;
  ClipTokenizer::Options tok;
  tok.vocab_path = DMDSERVE_VOCAB_DIR "/vocab.json";
  tok.merges_path = DMDSERVE_VOCAB_DIR "/merges.txt";
  h->tokenizer = Must(ClipTokenizer::Create(tok));
  h->engine = std::make_unique<FakeEngine>(h->tokenizer.get(), h->limits);
  Metrics::Options metrics;
  metrics.models = {"fake-dmd", "fake-teacher"};
  metrics.devices = {"cpu"};
  h->metrics = Must(Metrics::Create(metrics));
  const std::string keys_path = WriteKeysFile();
  h->keys = Must(ApiKeys::Load(keys_path));
  unlink(keys_path.c_str());
  h->service = std::make_unique<ImageGenerationService>(h->engine.get(), h->metrics.get(),
                                                        h->limits, h->keys.get());
  grpc::ServerBuilder builder;
  builder.RegisterService(h->service.get());
  h->server = builder.BuildAndStart();
  FUZZ_CHECK(h->server != nullptr);
  h->stub =
      std::make_unique<grpc::GenericStub>(h->server->InProcessChannel(grpc::ChannelArguments()));
  return h;
}

Harness& GetHarness() {
  static Harness* const harness = Create();
  return *harness;
}

// What came back from one RPC: its status and every response message's bytes.
struct Reply {
  grpc::Status status;
  std::vector<std::string> messages;
};

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  FUZZ_CHECK(buffer.Dump(&slices).ok());
  std::string out;
  for (const grpc::Slice& s : slices)
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

void Await(grpc::CompletionQueue& cq, bool* ok) {
  void* tag = nullptr;
  FUZZ_CHECK(cq.Next(&tag, ok));
}

Reply CallUnary(Harness& h, grpc::ClientContext& context, const std::string& method,
                const grpc::ByteBuffer& request) {
  grpc::CompletionQueue& cq = h.cq;
  Reply reply;
  grpc::ByteBuffer response;
  auto call = h.stub->PrepareUnaryCall(&context, kService + method, request, &cq);
  call->StartCall();
  call->Finish(&response, &reply.status, nullptr);
  bool ok = false;
  Await(cq, &ok);
  if (reply.status.ok()) reply.messages.push_back(Flatten(response));
  return reply;
}

// GenerateStream through the generic (bidirectional) stub: one request, then every response.
Reply CallStream(Harness& h, grpc::ClientContext& context, const grpc::ByteBuffer& request) {
  grpc::CompletionQueue& cq = h.cq;
  Reply reply;
  bool ok = false;
  auto call = h.stub->PrepareCall(&context, std::string(kService) + "GenerateStream", &cq);
  call->StartCall(nullptr);
  Await(cq, &ok);
  call->WriteLast(request, grpc::WriteOptions(), nullptr);
  Await(cq, &ok);
  for (;;) {
    grpc::ByteBuffer response;
    call->Read(&response, nullptr);
    Await(cq, &ok);
    if (!ok) break;
    reply.messages.push_back(Flatten(response));
  }
  call->Finish(&reply.status, nullptr);
  Await(cq, &ok);
  return reply;
}

// The authorization metadata `in` sends; nullopt: none.
std::optional<std::string> Authorization(const RequestInput& in) {
  switch (in.auth) {
    case RequestInput::Auth::kUnlimitedKey:
      return std::string("Bearer ") + kOpenSecret;
    case RequestInput::Auth::kLimitedKey:
      return std::string("Bearer ") + kLimitedSecret;
    case RequestInput::Auth::kFromInput: {
      std::string value = in.authorization;
      for (char& c : value) c = absl::ascii_isprint(static_cast<unsigned char>(c)) ? c : ' ';
      return value;
    }
    case RequestInput::Auth::kNone:
      break;
  }
  return std::nullopt;
}

// Sends `in` as one RPC.
Reply Send(Harness& h, const RequestInput& in) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  if (const auto value = Authorization(in)) context.AddMetadata("authorization", *value);
  grpc::Slice slice(in.wire);
  const grpc::ByteBuffer request(&slice, 1);
  ++h.rpcs;
  switch (in.method) {
    case RequestInput::Method::kGenerate:
      return CallUnary(h, context, "Generate", request);
    case RequestInput::Method::kGenerateStream:
      return CallStream(h, context, request);
    case RequestInput::Method::kTokenize:
      return CallUnary(h, context, "Tokenize", request);
    case RequestInput::Method::kListModels:
      return CallUnary(h, context, "ListModels", request);
  }
  std::abort();
}

// Whether the authorization `in` sends names a key, as ApiKeys documents it: "Bearer " in any
// case, then the secret, surrounding whitespace ignored.
bool Authorized(const RequestInput& in) {
  const std::optional<std::string> value = Authorization(in);
  if (!value || !absl::StartsWithIgnoreCase(*value, "Bearer ")) return false;
  const absl::string_view secret = absl::StripAsciiWhitespace(absl::string_view(*value).substr(7));
  return secret == kOpenSecret || secret == kLimitedSecret;
}

// Whether `r` breaks a limit the server documents (README, request_validation.h), computed here
// from the request alone: such a request must never succeed.
bool BreaksALimit(const v1::GenerateRequest& r, const RequestLimits& limits) {
  bool printable_id = true;
  for (char c : r.request_id()) printable_id &= absl::ascii_isprint(static_cast<unsigned char>(c));
  return r.prompt().empty() || static_cast<int>(r.prompt().size()) > limits.max_prompt_bytes ||
         r.num_images() < 0 || r.num_images() > limits.max_images_per_request || r.width() < 0 ||
         r.height() < 0 || (r.width() == 0) != (r.height() == 0) ||
         static_cast<int>(r.request_id().size()) > limits.max_request_id_bytes || !printable_id ||
         static_cast<int>(r.model().size()) > limits.max_model_name_bytes;
}

bool NamesAField(const std::string& message) {
  static constexpr const char* kFields[] = {"model",  "prompt",   "num_images", "width",
                                            "height", "encoding", "request_id", "text"};
  for (const char* field : kFields) {
    if (absl::StrContains(message, field)) return true;
  }
  return false;
}

// The images of an OK Generate (one GenerateResponse) or GenerateStream (one GeneratedImage per
// message) reply: exactly indexes 0..n-1, each with the engine's bytes.
void CheckImages(const RequestInput& in, const v1::GenerateRequest& request, const Reply& reply) {
  std::vector<v1::GeneratedImage> images;
  if (in.method == RequestInput::Method::kGenerate) {
    FUZZ_CHECK(reply.messages.size() == 1);
    v1::GenerateResponse response;
    FUZZ_CHECK(response.ParseFromString(reply.messages[0]));
    FUZZ_CHECK(response.request_id() == request.request_id());
    images.assign(response.images().begin(), response.images().end());
  } else {
    for (const std::string& bytes : reply.messages) {
      FUZZ_CHECK(images.emplace_back().ParseFromString(bytes));
    }
  }
  const size_t n = request.num_images() == 0 ? 1 : static_cast<size_t>(request.num_images());
  FUZZ_CHECK(images.size() == n);
  std::set<int> indexes;
  for (const v1::GeneratedImage& image : images) {
    FUZZ_CHECK(image.data() == FakeEngine::ImageBytes(request.prompt(), image.index()));
    indexes.insert(image.index());
  }
  FUZZ_CHECK(indexes.size() == n && *indexes.begin() == 0 && *indexes.rbegin() == int(n) - 1);
}

void CheckGenerate(const Harness& h, const RequestInput& in, const v1::GenerateRequest& request,
                   const Reply& reply) {
  const grpc::StatusCode code = reply.status.error_code();
  FUZZ_CHECK(code == grpc::StatusCode::OK || code == grpc::StatusCode::INVALID_ARGUMENT ||
             code == grpc::StatusCode::NOT_FOUND ||
             (code == grpc::StatusCode::RESOURCE_EXHAUSTED &&
              in.auth != RequestInput::Auth::kUnlimitedKey));
  if (code == grpc::StatusCode::INVALID_ARGUMENT) {
    FUZZ_CHECK(NamesAField(reply.status.error_message()));
  }
  if (code == grpc::StatusCode::NOT_FOUND) {
    FUZZ_CHECK(request.model() != "" && request.model() != "fake-dmd" &&
               request.model() != "fake-teacher");
  }
  if (BreaksALimit(request, h.limits)) FUZZ_CHECK(code != grpc::StatusCode::OK);
  if (code == grpc::StatusCode::OK) CheckImages(in, request, reply);
}

void CheckTokenize(const Harness& h, const v1::TokenizeRequest& request, const Reply& reply) {
  const grpc::StatusCode code = reply.status.error_code();
  FUZZ_CHECK(code == grpc::StatusCode::OK || code == grpc::StatusCode::INVALID_ARGUMENT ||
             code == grpc::StatusCode::NOT_FOUND);
  if (static_cast<int>(request.text().size()) > h.limits.max_prompt_bytes) {
    FUZZ_CHECK(code == grpc::StatusCode::INVALID_ARGUMENT);
  }
  if (code != grpc::StatusCode::OK) return;
  v1::TokenizeResponse response;
  FUZZ_CHECK(reply.messages.size() == 1 && response.ParseFromString(reply.messages[0]));
  const absl::StatusOr<std::vector<int32_t>> ids = h.tokenizer->Encode(request.text());
  FUZZ_CHECK(ids.ok());
  FUZZ_CHECK(std::vector<int32_t>(response.ids().begin(), response.ids().end()) == *ids);
}

void CheckListModels(const Reply& reply) {
  FUZZ_CHECK(reply.status.ok() && reply.messages.size() == 1);
  v1::ListModelsResponse response;
  FUZZ_CHECK(response.ParseFromString(reply.messages[0]));
  FUZZ_CHECK(response.models_size() == 2 && response.models(0).name() == "fake-dmd");
}

// dmdserve_requests_total summed over every label.
double RequestsCounted(const Harness& h) {
  double total = 0;
  for (const prometheus::MetricFamily& family : h.metrics->registry()->Collect()) {
    if (family.name != "dmdserve_requests_total") continue;
    for (const prometheus::ClientMetric& metric : family.metric) total += metric.counter.value;
  }
  return total;
}

void CheckReply(Harness& h, const RequestInput& in, const Reply& reply) {
  const grpc::StatusCode code = reply.status.error_code();
  FUZZ_CHECK(code == grpc::StatusCode::OK || !reply.status.error_message().empty());
  FUZZ_CHECK(h.engine->accepted() == h.engine->finished());
  // Counts only grow, so a check every 64 RPCs still catches any RPC counted twice or never.
  if (h.rpcs % 64 == 0) FUZZ_CHECK(RequestsCounted(h) == static_cast<double>(h.rpcs));
  std::unique_ptr<google::protobuf::Message> request = RequestInput::NewMessage(in.method);
  if (!request->ParseFromString(in.wire)) {
    FUZZ_CHECK(code == grpc::StatusCode::INVALID_ARGUMENT);
    FUZZ_CHECK(absl::StartsWith(reply.status.error_message(), "the request is not a valid "));
    return;
  }
  if (!Authorized(in)) {
    FUZZ_CHECK(code == grpc::StatusCode::UNAUTHENTICATED);
    return;
  }
  switch (in.method) {
    case RequestInput::Method::kGenerate:
    case RequestInput::Method::kGenerateStream:
      return CheckGenerate(h, in, static_cast<const v1::GenerateRequest&>(*request), reply);
    case RequestInput::Method::kTokenize:
      return CheckTokenize(h, static_cast<const v1::TokenizeRequest&>(*request), reply);
    case RequestInput::Method::kListModels:
      return CheckListModels(reply);
  }
}

}  // namespace
}  // namespace dmdserve::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using dmdserve::fuzz::RequestInput;
  dmdserve::fuzz::Harness& harness = dmdserve::fuzz::GetHarness();
  const RequestInput in = RequestInput::Decode(data, size);
  const dmdserve::fuzz::Reply reply = dmdserve::fuzz::Send(harness, in);
  dmdserve::fuzz::CheckReply(harness, in, reply);
  return 0;
}
