#include "server/api_keys.h"

#include <openssl/evp.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/test_util.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string HexSha256(const std::string& secret) {
  unsigned char digest[32];
  unsigned int size = 0;
  EVP_Digest(secret.data(), secret.size(), digest, &size, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned char byte : digest) absl::StrAppend(&hex, absl::Hex(byte, absl::kZeroPad2));
  return hex;
}

class ApiKeysTest : public ::testing::Test {
 protected:
  std::unique_ptr<ApiKeys> Load(const std::string& text) {
    testing::WriteFile(path_, text);
    auto keys = ApiKeys::Load(path_, &clock_);
    EXPECT_TRUE(keys.ok()) << keys.status();
    return keys.ok() ? *std::move(keys) : nullptr;
  }

  const std::string path_ = testing::MakeTempDir() + "/keys";
  FakeClock clock_;
};

TEST_F(ApiKeysTest, AuthenticatesBearerSecretsByTheirHash) {
  auto keys = Load(absl::StrCat("# team keys\n\nalice ", HexSha256("s3cret-a"), "\n",
                                "bob  ", HexSha256("s3cret-b"), "  2.5  # limited\n"));
  ASSERT_NE(keys, nullptr);
  EXPECT_EQ(keys->size(), 2);
  EXPECT_EQ(*keys->Authenticate("Bearer s3cret-a"), "alice");
  EXPECT_EQ(*keys->Authenticate("bearer s3cret-b"), "bob");
  for (const char* bad : {"", "s3cret-a", "Bearer", "Bearer s3cret-c", "Basic s3cret-a"}) {
    absl::StatusOr<std::string> name = keys->Authenticate(bad);
    EXPECT_EQ(name.status().code(), absl::StatusCode::kUnauthenticated) << bad;
    EXPECT_THAT(name.status().message(), Not(HasSubstr("s3cret"))) << bad;
  }
}

TEST_F(ApiKeysTest, BadLinesNameTheFileLineAndProblem) {
  const std::string hash = HexSha256("x");
  struct Case {
    std::string text;
    std::string message;
  };
  const Case cases[] = {
      {"alice", ":1: expected NAME SHA256HEX [IMAGES_PER_SECOND], got 1 field(s)"},
      {"# ok\nal ice " + hash + " 3",
       ":2: expected NAME SHA256HEX [IMAGES_PER_SECOND], got 4 field(s)"},
      {"al/ice " + hash, ":1: name 'al/ice' must be"},
      {"alice abc", ":1: key 'alice': the hash must be 64 hex digits"},
      {"alice " + hash + " -1", "IMAGES_PER_SECOND must be a number > 0, got '-1'"},
      {"alice " + hash + " fast", "got 'fast'"},
      {"alice " + hash + "\nbob " + hash, ":2: key 'bob' repeats the name or hash of key 'alice'"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::vector<ApiKeys::Key>> keys = ApiKeys::Parse(c.text, "keys.txt");
    EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_THAT(keys.status().message(), HasSubstr(c.message)) << c.text;
    EXPECT_THAT(keys.status().message(), HasSubstr("keys.txt:")) << c.text;
  }
}

TEST_F(ApiKeysTest, RateLimitIsATokenBucketWithTwoSecondsOfBurst) {
  auto keys = Load(absl::StrCat("slow ", HexSha256("a"), " 4\nfree ", HexSha256("b"), "\n"));
  ASSERT_NE(keys, nullptr);
  EXPECT_TRUE(keys->Admit("slow", 8).ok());  // the full burst: 2 s x 4 images/s
  absl::Status refused = keys->Admit("slow", 1);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.message(), HasSubstr("API key 'slow' is limited to 4 images per second"));
  clock_.Advance(absl::Milliseconds(500));  // refills 2 images
  EXPECT_TRUE(keys->Admit("slow", 2).ok());
  EXPECT_FALSE(keys->Admit("slow", 1).ok());
  clock_.Advance(absl::Seconds(100));  // never more than the burst
  absl::Status never = keys->Admit("slow", 9);
  EXPECT_EQ(never.code(), absl::StatusCode::kInvalidArgument);  // no wait would admit it
  EXPECT_THAT(never.message(), HasSubstr("num_images is 9; the limit for API key 'slow' is 8"));
  EXPECT_TRUE(keys->Admit("slow", 8).ok());  // the refusal took nothing
  EXPECT_TRUE(keys->Admit("free", 1000).ok());  // no limit
}

TEST_F(ApiKeysTest, ReloadReplacesKeysAndKeepsTheOldOnesOnError) {
  auto keys = Load(absl::StrCat("alice ", HexSha256("a"), " 1\n"));
  ASSERT_NE(keys, nullptr);
  EXPECT_TRUE(keys->Admit("alice", 2).ok());
  testing::WriteFile(path_, absl::StrCat("alice ", HexSha256("a"), " 1\ncarol ",
                                         HexSha256("c"), "\n"));
  ASSERT_EQ(*keys->Reload(), 2);
  EXPECT_EQ(*keys->Authenticate("Bearer c"), "carol");
  EXPECT_FALSE(keys->Admit("alice", 1).ok());  // alice's bucket kept its (empty) level
  testing::WriteFile(path_, "broken");
  EXPECT_EQ(keys->Reload().status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*keys->Authenticate("Bearer c"), "carol");  // still the previous keys
}

}  // namespace
}  // namespace dmdserve
