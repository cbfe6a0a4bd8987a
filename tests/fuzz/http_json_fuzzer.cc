// libFuzzer target: the HTTP API's request bodies (server/openai_api.h, server/native_json.h),
// from bytes to the gRPC request, and every error back out as the JSON the client reads.
//
// The first byte picks the parser, the rest is the body:
//   0  ParseImagesRequest (POST /v1/images/generations), with an alias table
//   1  ParseNativeJson into GenerateRequest (POST /v1/generate, /v1/generate:stream)
//   2  ParseNativeJson into ListModelsRequest (POST /v1/models:list)
//   3  ParseNativeJson into TokenizeRequest (POST /v1/tokenize)
// Invariants on every input:
//   - a refusal is INVALID_ARGUMENT with a message; its HTTP error (both styles, after the
//     route's param tagging) is a JSON object {"error": {"message": <non-empty>, ...}} with a 4xx;
//   - an accepted native body prints as JSON (ToNativeJson) that parses back to the same message
//     (nothing accepted is lost or changed in the round trip);
//   - an accepted OpenAI body asks for a count >= 0 (0: one) of PNG and names no alias (aliases are
//     resolved); request validation (ToGenerateParams) then answers OK or INVALID_ARGUMENT.
// Sanitizers (ASan, UBSan) catch memory and undefined-behaviour errors on the way.
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "dmdserve/v1/dmdserve.pb.h"
#include "google/protobuf/util/message_differencer.h"
#include "nlohmann/json.hpp"
#include "server/native_json.h"
#include "server/openai_api.h"
#include "server/request_validation.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using dmdserve::ErrorStyle;

// The refusal `status` as the client reads it, in both error styles.
void CheckRefusal(const absl::Status& status) {
  FUZZ_CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  FUZZ_CHECK(!status.message().empty());
  for (ErrorStyle style : {ErrorStyle::kOpenAi, ErrorStyle::kNative}) {
    const dmdserve::HttpError error = dmdserve::ToHttpError(status, style);
    FUZZ_CHECK(error.http_status == 400);
    const nlohmann::json body = nlohmann::json::parse(error.body, nullptr, false);
    FUZZ_CHECK(body.is_object() && body.contains("error") && body["error"].is_object());
    FUZZ_CHECK(body["error"]["message"].is_string() &&
               !body["error"]["message"].get<std::string>().empty());
  }
}

void CheckValidation(const dmdserve::v1::GenerateRequest& request,
                     const google::protobuf::Descriptor& descriptor) {
  absl::StatusOr<dmdserve::GenerateParams> params =
      dmdserve::ToGenerateParams(request, dmdserve::RequestLimits(), absl::InfiniteFuture());
  if (!params.ok()) CheckRefusal(dmdserve::WithFieldParam(params.status(), descriptor));
}

void FuzzOpenAi(absl::string_view body) {
  static const dmdserve::ModelAliases aliases = {{"gpt-image-1", "tiny-random"}};
  absl::StatusOr<dmdserve::ImagesRequest> parsed = dmdserve::ParseImagesRequest(body, aliases);
  if (!parsed.ok()) return CheckRefusal(parsed.status());
  const dmdserve::v1::GenerateRequest& request = parsed->request;
  FUZZ_CHECK(request.num_images() >= 0);  // 0: absent, one image
  FUZZ_CHECK(request.encoding() == dmdserve::v1::IMAGE_ENCODING_PNG);
  FUZZ_CHECK(request.model() != "gpt-image-1");
  absl::StatusOr<dmdserve::GenerateParams> params =
      dmdserve::ToGenerateParams(request, dmdserve::RequestLimits(), absl::InfiniteFuture());
  if (!params.ok()) CheckRefusal(dmdserve::WithOpenAiParam(params.status()));
}

template <typename Request>
void FuzzNative(absl::string_view body) {
  Request request;
  const absl::Status parsed = dmdserve::ParseNativeJson(body, &request);
  if (!parsed.ok()) return CheckRefusal(parsed);
  absl::StatusOr<std::string> printed = dmdserve::ToNativeJson(request);
  FUZZ_CHECK(printed.ok());
  Request again;
  FUZZ_CHECK(dmdserve::ParseNativeJson(*printed, &again).ok());
  FUZZ_CHECK(google::protobuf::util::MessageDifferencer::Equals(request, again));
  if constexpr (std::is_same_v<Request, dmdserve::v1::GenerateRequest>) {
    CheckValidation(request, *Request::descriptor());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const absl::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (data[0] % 4) {
    case 0:
      FuzzOpenAi(body);
      break;
    case 1:
      FuzzNative<dmdserve::v1::GenerateRequest>(body);
      break;
    case 2:
      FuzzNative<dmdserve::v1::ListModelsRequest>(body);
      break;
    default:
      FuzzNative<dmdserve::v1::TokenizeRequest>(body);
      break;
  }
  return 0;
}
