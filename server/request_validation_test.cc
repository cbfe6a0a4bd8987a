#include "server/request_validation.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;

v1::GenerateRequest Valid() {
  v1::GenerateRequest r;
  r.set_prompt("a photo of a sneaker");
  return r;
}

void ExpectInvalid(const v1::GenerateRequest& r, const std::string& field) {
  absl::StatusOr<GenerateParams> p = ToGenerateParams(r, RequestLimits{}, absl::InfiniteFuture());
  ASSERT_FALSE(p.ok()) << field;
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << field;
  EXPECT_THAT(std::string(p.status().message()), HasSubstr(field));
}

TEST(RequestValidationTest, DefaultsAreFilledIn) {
  absl::StatusOr<GenerateParams> p =
      ToGenerateParams(Valid(), RequestLimits{}, absl::InfiniteFuture());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->num_images, 1);
  EXPECT_FALSE(p->seed.has_value());
  EXPECT_EQ(p->encoding, ImageEncoding::kPng);
  EXPECT_EQ(p->width, 0);
  EXPECT_EQ(p->model, "");
}

TEST(RequestValidationTest, ConvertsEveryField) {
  v1::GenerateRequest r = Valid();
  r.set_model("m");
  r.set_num_images(3);
  r.set_seed(0);  // an explicit 0 is a seed, not "absent"
  r.set_width(64);
  r.set_height(32);
  r.set_encoding(v1::IMAGE_ENCODING_RAW);
  r.set_request_id("abc-1");
  const absl::Time deadline = absl::FromUnixSeconds(100);
  absl::StatusOr<GenerateParams> p = ToGenerateParams(r, RequestLimits{}, deadline);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->model, "m");
  EXPECT_EQ(p->num_images, 3);
  ASSERT_TRUE(p->seed.has_value());
  EXPECT_EQ(*p->seed, 0u);
  EXPECT_EQ(p->width, 64);
  EXPECT_EQ(p->height, 32);
  EXPECT_EQ(p->encoding, ImageEncoding::kRaw);
  EXPECT_EQ(p->request_id, "abc-1");
  EXPECT_EQ(p->deadline, deadline);
}

TEST(RequestValidationTest, RejectsBadFieldsNamingThem) {
  v1::GenerateRequest r = Valid();
  r.clear_prompt();
  ExpectInvalid(r, "prompt");
  r = Valid();
  r.set_prompt(std::string(4097, 'a'));
  ExpectInvalid(r, "prompt is 4097 bytes; the limit is 4096");
  r = Valid();
  r.set_num_images(-1);
  ExpectInvalid(r, "num_images");
  r = Valid();
  r.set_num_images(65);
  ExpectInvalid(r, "num_images is 65; the limit is 64");
  r = Valid();
  r.set_width(-5);
  r.set_height(32);
  ExpectInvalid(r, "width");
  r = Valid();
  r.set_width(32);
  ExpectInvalid(r, "width and height");
  r = Valid();
  r.set_encoding(static_cast<v1::ImageEncoding>(9));
  ExpectInvalid(r, "encoding 9");
  r = Valid();
  r.set_request_id(std::string(129, 'x'));
  ExpectInvalid(r, "request_id is 129 bytes");
  r = Valid();
  r.set_request_id("tab\there");
  ExpectInvalid(r, "request_id must be printable");
  r = Valid();
  r.set_model(std::string(300, 'm'));
  ExpectInvalid(r, "model is 300 bytes");
  r = Valid();
  r.set_model("tiny\nrpc=Generate forged line");
  ExpectInvalid(r, "model must be printable ASCII");
}

TEST(RequestValidationTest, LimitsComeFromOptions) {
  v1::GenerateRequest r = Valid();
  r.set_num_images(5);
  RequestLimits limits;
  limits.max_images_per_request = 4;
  EXPECT_FALSE(ToGenerateParams(r, limits, absl::InfiniteFuture()).ok());
  limits.max_images_per_request = 5;
  EXPECT_TRUE(ToGenerateParams(r, limits, absl::InfiniteFuture()).ok());
}

TEST(RequestValidationTest, TokenizeChecksTextLengthAndModel) {
  v1::TokenizeRequest r;
  r.set_text("");  // empty text is fine: it tokenizes to no ids
  EXPECT_TRUE(ValidateTokenizeRequest(r, RequestLimits{}).ok());
  r.set_text(std::string(5000, 'a'));
  absl::Status s = ValidateTokenizeRequest(r, RequestLimits{});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("text is 5000 bytes"));
}

}  // namespace
}  // namespace dmdserve
