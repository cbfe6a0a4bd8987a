#include "server/openai_api.h"

#include <gtest/gtest.h>

#include "absl/strings/escaping.h"
#include "nlohmann/json.hpp"

namespace dmdserve {
namespace {

using Json = nlohmann::json;

TEST(ParseImagesRequestTest, MapsEveryFieldOntoTheGrpcRequest) {
  const ModelAliases aliases = {{"gpt-image-1", "fashion-dmd"}};
  absl::StatusOr<ImagesRequest> r = ParseImagesRequest(
      R"({"prompt":"a sneaker","model":"gpt-image-1","n":3,"size":"32x48","seed":18446744073709551615,
          "response_format":"b64_json","output_format":"png","user":"u1","quality":"high"})",
      aliases);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->request.prompt(), "a sneaker");
  EXPECT_EQ(r->request.model(), "fashion-dmd");
  EXPECT_EQ(r->request.num_images(), 3);
  EXPECT_EQ(r->request.width(), 32);
  EXPECT_EQ(r->request.height(), 48);
  ASSERT_TRUE(r->request.has_seed());
  EXPECT_EQ(r->request.seed(), 18446744073709551615ull);
  EXPECT_EQ(r->request.encoding(), v1::IMAGE_ENCODING_PNG);
  EXPECT_EQ(r->user, "u1");
}

TEST(ParseImagesRequestTest, AbsentFieldsMeanTheDefaults) {
  absl::StatusOr<ImagesRequest> r =
      ParseImagesRequest(R"({"prompt":"x","model":null,"size":"auto"})", {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->request.model(), "");
  EXPECT_EQ(r->request.num_images(), 0);  // 0 means 1 in validation
  EXPECT_EQ(r->request.width(), 0);
  EXPECT_FALSE(r->request.has_seed());
  // A name that is no alias passes through unchanged.
  r = ParseImagesRequest(R"({"prompt":"x","model":"tiny"})", {{"a", "b"}});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->request.model(), "tiny");
}

TEST(ParseImagesRequestTest, BadFieldsAreInvalidArgumentNamingTheParam) {
  const struct {
    const char* body;
    const char* param;  // "" : none
  } cases[] = {
      {"not json", ""},
      {"[1,2]", ""},
      {R"({"n":1})", "prompt"},
      {R"({"prompt":5})", "prompt"},
      {R"({"prompt":"x","n":0})", "n"},
      {R"({"prompt":"x","n":1.5})", "n"},
      {R"({"prompt":"x","n":"2"})", "n"},
      {R"({"prompt":"x","size":"64"})", "size"},
      {R"({"prompt":"x","size":"0x64"})", "size"},
      {R"({"prompt":"x","size":"64x64x2"})", "size"},
      {R"({"prompt":"x","size":64})", "size"},
      {R"({"prompt":"x","seed":-1})", "seed"},
      {R"({"prompt":"x","seed":"7"})", "seed"},
      {R"({"prompt":"x","response_format":"url"})", "response_format"},
      {R"({"prompt":"x","output_format":"jpeg"})", "output_format"},
      {R"({"prompt":"x","model":3})", "model"},
      {R"({"prompt":"x","user":{}})", "user"},
  };
  for (const auto& c : cases) {
    absl::StatusOr<ImagesRequest> r = ParseImagesRequest(c.body, {});
    ASSERT_FALSE(r.ok()) << c.body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.body;
    EXPECT_EQ(ErrorParam(r.status()), c.param) << c.body;
  }
  // "url" is refused with the reason.
  EXPECT_NE(ParseImagesRequest(R"({"prompt":"x","response_format":"url"})", {})
                .status()
                .message()
                .find("keeps no image files"),
            absl::string_view::npos);
}

TEST(ToHttpErrorTest, MapsEachCodeToItsHttpStatusInOpenAisShape) {
  const struct {
    absl::StatusCode code;
    int http;
    const char* type;
  } cases[] = {
      {absl::StatusCode::kInvalidArgument, 400, "invalid_request_error"},
      {absl::StatusCode::kUnauthenticated, 401, "invalid_request_error"},
      {absl::StatusCode::kNotFound, 404, "invalid_request_error"},
      {absl::StatusCode::kResourceExhausted, 429, "rate_limit_error"},
      {absl::StatusCode::kUnavailable, 503, "server_error"},
      {absl::StatusCode::kCancelled, 503, "server_error"},
      {absl::StatusCode::kDeadlineExceeded, 504, "server_error"},
      {absl::StatusCode::kInternal, 500, "server_error"},
  };
  for (const auto& c : cases) {
    const HttpError e = ToHttpError(absl::Status(c.code, "why"));
    EXPECT_EQ(e.http_status, c.http) << static_cast<int>(c.code);
    const Json body = Json::parse(e.body, nullptr, false);
    ASSERT_TRUE(body.is_object()) << e.body;
    EXPECT_EQ(body["error"]["message"], "why");
    EXPECT_EQ(body["error"]["type"], c.type);
    EXPECT_TRUE(body["error"]["param"].is_null());
    EXPECT_TRUE(body["error"]["code"].is_string());
  }
  const Json body = Json::parse(ToHttpError(InvalidParam("size", "bad size")).body);
  EXPECT_EQ(body["error"]["param"], "size");
  EXPECT_EQ(Json::parse(ToHttpError(absl::NotFoundError("m")).body)["error"]["code"],
            "model_not_found");
  // Invalid UTF-8 in a message (say, an echoed model name) never breaks the body.
  EXPECT_TRUE(Json::parse(ToHttpError(absl::NotFoundError("bad \xff name")).body, nullptr, false)
                  .is_object());
}

TEST(ToHttpErrorTest, OpenAiErrorsHaveExactlyOpenAisFields) {
  const Json body = Json::parse(ToHttpError(absl::InternalError("x")).body);
  EXPECT_EQ(body["error"].size(), 4u) << body;
  EXPECT_FALSE(body["error"].contains("status"));
}

TEST(ToHttpErrorTest, NativeErrorsAddTheCanonicalCodesName) {
  const HttpError e = ToHttpError(InvalidParam("num_images", "bad"), ErrorStyle::kNative);
  EXPECT_EQ(e.http_status, 400);
  const Json body = Json::parse(e.body);
  EXPECT_EQ(body["error"]["status"], "INVALID_ARGUMENT");
  EXPECT_EQ(body["error"]["param"], "num_images");
  EXPECT_EQ(body["error"]["code"], "invalid_value");
  EXPECT_EQ(Json::parse(ToHttpError(absl::DeadlineExceededError("late"), ErrorStyle::kNative)
                            .body)["error"]["status"],
            "DEADLINE_EXCEEDED");
  EXPECT_EQ(Json::parse(MakeHttpError(413, "invalid_request_error", "request_too_large", "big",
                                      "OUT_OF_RANGE")
                            .body)["error"]["status"],
            "OUT_OF_RANGE");
}

TEST(WithOpenAiParamTest, NamesTheOpenAiParamOfValidationAndEngineErrors) {
  const struct {
    const char* message;
    const char* param;
  } cases[] = {
      {"prompt is required", "prompt"},
      {"prompt: 80 tokens; the limit is 77", "prompt"},
      {"num_images is 9; the limit is 8", "n"},
      {"width x height 48x48 is not supported by model 'm'", "size"},
      {"height must be >= 0 (0 means the model default)", "size"},
      {"model is 300 bytes; the limit is 256", "model"},
      {"request_id must be printable ASCII", ""},  // a header, not a body parameter
      {"prompts are fine", ""},                    // the whole first word must match
  };
  for (const auto& c : cases) {
    const absl::Status tagged = WithOpenAiParam(absl::InvalidArgumentError(c.message));
    EXPECT_EQ(ErrorParam(tagged), c.param) << c.message;
    EXPECT_EQ(tagged.message(), c.message);
    EXPECT_EQ(tagged.code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(LeadingField(absl::InvalidArgumentError("num_images is 9")), "num_images");
  EXPECT_EQ(LeadingField(absl::InvalidArgumentError("prompt: too long")), "prompt");
  EXPECT_EQ(LeadingField(InvalidParam("size", "prompt x")), "");
  EXPECT_EQ(LeadingField(absl::NotFoundError("model 'x' is not served")), "");
  // Already tagged, or not INVALID_ARGUMENT: unchanged.
  EXPECT_EQ(ErrorParam(WithOpenAiParam(InvalidParam("size", "prompt x"))), "size");
  EXPECT_EQ(ErrorParam(WithOpenAiParam(absl::NotFoundError("model 'x' is not served"))), "");
}

TEST(ResponseJsonTest, ImagesAreBase64PngsWithTheirSeedsInIndexOrder) {
  GenerateResult result;
  result.images.push_back({0, 7, 1, 1, 3, ImageEncoding::kPng, "\x89PNG-a", {}});
  result.images.push_back({1, 8, 1, 1, 3, ImageEncoding::kPng, "\x89PNG-b", {}});
  const Json body = Json::parse(ImagesResponseJson(result, absl::FromUnixSeconds(1700000000)));
  EXPECT_EQ(body["created"], 1700000000);
  ASSERT_EQ(body["data"].size(), 2u);
  std::string decoded;
  ASSERT_TRUE(absl::Base64Unescape(body["data"][1]["b64_json"].get<std::string>(), &decoded));
  EXPECT_EQ(decoded, "\x89PNG-b");
  EXPECT_EQ(body["data"][0]["seed"], 7);
}

TEST(ResponseJsonTest, ModelsInOpenAisListShape) {
  ModelInfo a;
  a.name = "fashion-dmd";
  const Json body =
      Json::parse(ModelsResponseJson({a}, absl::FromUnixSeconds(5)));
  EXPECT_EQ(body["object"], "list");
  EXPECT_EQ(body["data"][0],
            Json({{"id", "fashion-dmd"}, {"object", "model"}, {"created", 5},
                  {"owned_by", "dmdserve"}}));
}

TEST(ParseModelAliasesTest, ParsesPairsAndRejectsMalformedOnes) {
  absl::StatusOr<ModelAliases> a = ParseModelAliases("gpt-image-1=fashion-dmd, dall-e-3 = tiny");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->at("gpt-image-1"), "fashion-dmd");
  EXPECT_EQ(a->at("dall-e-3"), "tiny");
  EXPECT_TRUE(ParseModelAliases("")->empty());
  for (const char* bad : {"x", "=y", "x=", "a=b,a=c"}) {
    EXPECT_EQ(ParseModelAliases(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

}  // namespace
}  // namespace dmdserve
