#include "server/wire_format.h"

#include <string>

#include "dmdserve/v1/dmdserve.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;

grpc::ByteBuffer Bytes(const std::string& data) {
  grpc::Slice slice(data);
  return grpc::ByteBuffer(&slice, 1);
}

// A length-delimited field `number` holding `value`, as protobuf encodes it (lengths < 128).
std::string Delimited(int number, const std::string& value) {
  return std::string(1, static_cast<char>(number << 3 | 2)) +
         std::string(1, static_cast<char>(value.size())) + value;
}

absl::Status Parse(const std::string& data) {
  v1::GenerateRequest request;
  return ParseRequest(Bytes(data), &request);
}

TEST(WireFormatTest, AValidRequestParses) {
  v1::GenerateRequest original;
  original.set_prompt("a photo of a cat");
  original.set_num_images(3);
  original.set_request_id("r1");
  v1::GenerateRequest parsed;
  ASSERT_TRUE(ParseRequest(Bytes(original.SerializeAsString()), &parsed).ok());
  EXPECT_EQ(parsed.SerializeAsString(), original.SerializeAsString());
  // Empty bytes are the default message.
  EXPECT_TRUE(Parse("").ok());
}

TEST(WireFormatTest, InvalidUtf8InAStringFieldNamesTheField) {
  v1::GenerateRequest request;
  const int prompt = request.GetDescriptor()->FindFieldByName("prompt")->number();
  const absl::Status s = Parse(Delimited(prompt, "caf\xC3"));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("the request is not a valid dmdserve.v1.GenerateRequest"));
  EXPECT_THAT(s.message(), HasSubstr("field 'prompt' is not valid UTF-8"));
}

TEST(WireFormatTest, MalformedWireBytesSaySo) {
  // A length past the end, a truncated varint, a bad wire type (7), random bytes.
  for (const std::string& data : {std::string("\x0a\x10" "abc"), std::string("\x10\xff"),
                                  std::string("\x0f\x01"), std::string("\xff\xff\xff\xff")}) {
    const absl::Status s = Parse(data);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(s.message(), HasSubstr("not valid protobuf wire format")) << s;
  }
}

TEST(WireFormatTest, DeepNestingIsRefusedAsMalformed) {
  // Nested groups 200 deep (start-group tags of field 15), never closed.
  const std::string data(200, static_cast<char>(15 << 3 | 3));
  const absl::Status s = Parse(data);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("not valid protobuf wire format"));
}

TEST(WireFormatTest, DescribeIsEmptyForBytesThatParse) {
  v1::GenerateRequest request;
  request.set_prompt("ok");
  EXPECT_EQ(DescribeParseFailure(request.SerializeAsString(), request.GetDescriptor()), "");
}

TEST(WireFormatTest, SerializedResponsesParseBack) {
  v1::TokenizeResponse response;
  response.set_model("tiny-random");
  response.add_ids(320);
  grpc::ByteBuffer bytes;
  ASSERT_TRUE(SerializeResponse(response, &bytes).ok());
  v1::TokenizeResponse parsed;
  ASSERT_TRUE(ParseRequest(bytes, &parsed).ok());
  EXPECT_EQ(parsed.model(), "tiny-random");
  EXPECT_EQ(parsed.ids(0), 320);
}

}  // namespace
}  // namespace dmdserve
