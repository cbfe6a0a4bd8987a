#include "server/native_json.h"

#include <gtest/gtest.h>

#include "dmdserve/v1/dmdserve.pb.h"
#include "google/protobuf/util/message_differencer.h"
#include "nlohmann/json.hpp"
#include "server/openai_api.h"

namespace dmdserve {
namespace {

using Json = nlohmann::json;

TEST(ParseNativeJsonTest, TakesProtoAndJsonFieldNames) {
  v1::GenerateRequest r;
  ASSERT_TRUE(ParseNativeJson(R"({"model":"m","prompt":"a boot","num_images":3,"seed":7,
      "width":32,"height":48,"encoding":"IMAGE_ENCODING_RAW","request_id":"r1"})",
                              &r)
                  .ok());
  EXPECT_EQ(r.model(), "m");
  EXPECT_EQ(r.prompt(), "a boot");
  EXPECT_EQ(r.num_images(), 3);
  ASSERT_TRUE(r.has_seed());
  EXPECT_EQ(r.seed(), 7u);
  EXPECT_EQ(r.width(), 32);
  EXPECT_EQ(r.height(), 48);
  EXPECT_EQ(r.encoding(), v1::IMAGE_ENCODING_RAW);
  EXPECT_EQ(r.request_id(), "r1");

  v1::GenerateRequest camel;
  ASSERT_TRUE(ParseNativeJson(R"({"numImages":2,"requestId":"r2","seed":"18446744073709551615",
      "encoding":1})",
                              &camel)
                  .ok());
  EXPECT_EQ(camel.num_images(), 2);
  EXPECT_EQ(camel.request_id(), "r2");
  EXPECT_EQ(camel.seed(), 18446744073709551615ull);
  EXPECT_EQ(camel.encoding(), v1::IMAGE_ENCODING_PNG);
}

TEST(ParseNativeJsonTest, EmptyBodyAndNullsMeanUnset) {
  v1::GenerateRequest r;
  r.set_prompt("left over");
  ASSERT_TRUE(ParseNativeJson("", &r).ok());
  EXPECT_EQ(r.prompt(), "");  // cleared
  ASSERT_TRUE(ParseNativeJson(" \n", &r).ok());
  ASSERT_TRUE(ParseNativeJson(R"({"prompt":"x","seed":null,"model":null})", &r).ok());
  EXPECT_FALSE(r.has_seed());
  EXPECT_EQ(r.model(), "");
  v1::ListModelsRequest list;
  EXPECT_TRUE(ParseNativeJson("{}", &list).ok());
}

TEST(ParseNativeJsonTest, UnknownFieldIsInvalidArgumentNamingIt) {
  v1::GenerateRequest r;
  const absl::Status s = ParseNativeJson(R"({"prompt":"x","num_image":2})", &r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ErrorParam(s), "num_image");
  EXPECT_NE(s.message().find("unknown field \"num_image\" in GenerateRequest"),
            absl::string_view::npos)
      << s;
  EXPECT_NE(s.message().find("num_images"), absl::string_view::npos) << s;  // lists the fields
  v1::ListModelsRequest list;
  EXPECT_EQ(ErrorParam(ParseNativeJson(R"({"verbose":true})", &list)), "verbose");
}

TEST(ParseNativeJsonTest, WrongTypesAreInvalidArgumentNamingTheField) {
  const struct {
    const char* body;
    const char* param;
  } cases[] = {
      {R"({"num_images":"many"})", "num_images"},
      {R"({"numImages":1.5})", "num_images"},
      {R"({"seed":-1})", "seed"},
      {R"({"prompt":5})", "prompt"},
      {R"({"width":99999999999})", "width"},
      {R"({"encoding":"JPEG"})", "encoding"},
  };
  for (const auto& c : cases) {
    v1::GenerateRequest r;
    const absl::Status s = ParseNativeJson(c.body, &r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.body;
    EXPECT_EQ(ErrorParam(s), c.param) << c.body << ": " << s;
    EXPECT_NE(s.message().find("GenerateRequest"), absl::string_view::npos) << s;
  }
}

TEST(ParseNativeJsonTest, BodyThatIsNoObjectIsInvalidArgument) {
  for (const char* body : {"[1]", "\"prompt\"", "{\"prompt\":", "not json", "7"}) {
    v1::TokenizeRequest r;
    const absl::Status s = ParseNativeJson(body, &r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << body;
    EXPECT_EQ(ErrorParam(s), "") << body;
    EXPECT_NE(s.message().find("JSON object"), absl::string_view::npos) << s;
  }
}

TEST(WithFieldParamTest, NamesTheRequestFieldThatValidationAndTheEngineNameFirst) {
  const struct {
    const char* message;
    const char* param;
  } cases[] = {
      {"prompt is required", "prompt"},
      {"prompt: 80 tokens; the limit is 77", "prompt"},
      {"num_images is 9; the limit is 8", "num_images"},
      {"width and height must both be 0 (the model default) or both be set", "width"},
      {"request_id must be printable ASCII", "request_id"},
      {"prompts are fine", ""},  // the whole first word must be a field
      {"n is 3", ""},            // OpenAI's name is no field of GenerateRequest
  };
  for (const auto& c : cases) {
    const absl::Status tagged =
        WithFieldParam(absl::InvalidArgumentError(c.message), *v1::GenerateRequest::descriptor());
    EXPECT_EQ(ErrorParam(tagged), c.param) << c.message;
    EXPECT_EQ(tagged.message(), c.message);
    EXPECT_EQ(tagged.code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(ErrorParam(WithFieldParam(absl::InvalidArgumentError("text is 5000 bytes"),
                                      *v1::TokenizeRequest::descriptor())),
            "text");
  // Already tagged, or not INVALID_ARGUMENT: unchanged.
  EXPECT_EQ(ErrorParam(WithFieldParam(InvalidParam("seed", "prompt x"),
                                      *v1::GenerateRequest::descriptor())),
            "seed");
  EXPECT_EQ(ErrorParam(WithFieldParam(absl::NotFoundError("model 'x' is not served"),
                                      *v1::GenerateRequest::descriptor())),
            "");
}

TEST(ToNativeJsonTest, PrintsEveryFieldInProtobufsMapping) {
  v1::GenerateResponse response;
  response.set_model("tiny");
  response.mutable_timings()->set_total_seconds(0.25);
  v1::GeneratedImage* image = response.add_images();
  image->set_index(0);
  image->set_seed(18446744073709551615ull);
  image->set_encoding(v1::IMAGE_ENCODING_PNG);
  image->set_data(std::string("\x89PNG\0\xff", 6));
  absl::StatusOr<std::string> text = ToNativeJson(response);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(text->find('\n'), std::string::npos);
  const Json json = Json::parse(*text);
  EXPECT_EQ(json["model"], "tiny");
  EXPECT_EQ(json["requestId"], "");  // defaults are printed, names in lowerCamelCase
  EXPECT_EQ(json["truncatedTokens"], 0);
  EXPECT_EQ(json["timings"]["totalSeconds"], 0.25);
  EXPECT_EQ(json["timings"]["batchSize"], 0);
  const Json& first = json["images"][0];
  EXPECT_EQ(first["index"], 0);
  EXPECT_EQ(first["seed"], "18446744073709551615");  // 64-bit integers as strings
  EXPECT_EQ(first["encoding"], "IMAGE_ENCODING_PNG");
  EXPECT_EQ(first["data"], "iVBORwD/");  // base64 with padding rules

  // What is printed parses back into the same message.
  v1::GenerateResponse back;
  ASSERT_TRUE(ParseNativeJson(*text, &back).ok());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(back, response));
}

}  // namespace
}  // namespace dmdserve
