// HttpStream's bookkeeping without a connection: every call here is one that never suspends
// (Read() only when there is something to read or the stream is closed), so the null connection
// is never touched. The suspend/resume path runs against the real server in
// tests/integration/test_http_native.py.
#include "server/http_stream.h"

#include <gtest/gtest.h>
#include <microhttpd.h>

#include <string>

namespace dmdserve {
namespace {

// Everything Read() hands out until the end of the stream.
std::string ReadAll(HttpStream& stream) {
  std::string out;
  char buf[7];  // small: lines come out in several pieces
  while (true) {
    const ssize_t n = stream.Read(buf, sizeof(buf));
    if (n == MHD_CONTENT_READER_END_OF_STREAM) return out;
    EXPECT_GT(n, 0);
    if (n <= 0) return out;
    out.append(buf, static_cast<size_t>(n));
  }
}

TEST(HttpStreamTest, LinesThenTheEnd) {
  HttpStream stream(nullptr);
  stream.AddLine("{\"index\":0}");
  EXPECT_FALSE(stream.SuspendUntilFirstEvent());  // a line came: no waiting
  ASSERT_TRUE(stream.Start().ok());
  stream.AddLine("{\"index\":1}");
  EXPECT_FALSE(stream.Close(absl::OkStatus(), "unused").has_value());  // connection not done
  EXPECT_EQ(ReadAll(stream), "{\"index\":0}\n{\"index\":1}\n");
  const std::optional<HttpStream::Outcome> outcome = stream.ConnectionDone(true);
  ASSERT_TRUE(outcome.has_value());
  EXPECT_TRUE(outcome->status.ok());
  EXPECT_EQ(outcome->lines, 2);
  EXPECT_FALSE(stream.client_gone());
}

TEST(HttpStreamTest, FailureBeforeTheFirstLineIsAnOrdinaryError) {
  HttpStream stream(nullptr);
  EXPECT_FALSE(stream.Close(absl::ResourceExhaustedError("full"), "{\"error\":{}}").has_value());
  EXPECT_FALSE(stream.SuspendUntilFirstEvent());
  const absl::Status start = stream.Start();
  EXPECT_EQ(start.code(), absl::StatusCode::kResourceExhausted);
  // Never started: the request was answered (and counted) as an error, not as a stream.
  EXPECT_FALSE(stream.ConnectionDone(true).has_value());
}

TEST(HttpStreamTest, FailureAfterTheFirstLineEndsTheBodyWithItsErrorLine) {
  HttpStream stream(nullptr);
  stream.AddLine("a");
  ASSERT_TRUE(stream.Start().ok());
  char buf[16];
  ASSERT_EQ(stream.Read(buf, sizeof(buf)), 2);  // "a\n" is sent before the failure
  EXPECT_FALSE(stream.Close(absl::CancelledError("grace"), "{\"error\":\"x\"}").has_value());
  EXPECT_EQ(ReadAll(stream), "{\"error\":\"x\"}\n");
  const std::optional<HttpStream::Outcome> outcome = stream.ConnectionDone(true);
  ASSERT_TRUE(outcome.has_value());
  EXPECT_EQ(outcome->status.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(outcome->lines, 1);
}

TEST(HttpStreamTest, ErrorLineFollowsTheImagesAndIsNoImage) {
  HttpStream stream(nullptr);
  stream.AddLine("a");
  stream.AddLine("b");
  EXPECT_FALSE(stream.Close(absl::InternalError("batch failed"), "{\"error\":1}").has_value());
  ASSERT_TRUE(stream.Start().ok());
  EXPECT_EQ(ReadAll(stream), "a\nb\n{\"error\":1}\n");
  const std::optional<HttpStream::Outcome> outcome = stream.ConnectionDone(true);
  ASSERT_TRUE(outcome.has_value());
  EXPECT_EQ(outcome->status.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(outcome->lines, 2);
}

TEST(HttpStreamTest, ClientThatGoesAwayMakesAnOkStreamCancelled) {
  HttpStream stream(nullptr);
  stream.AddLine("a");
  ASSERT_TRUE(stream.Start().ok());
  EXPECT_FALSE(stream.ConnectionDone(false).has_value());
  EXPECT_TRUE(stream.client_gone());  // polled as is_cancelled: the rest is dropped
  const std::optional<HttpStream::Outcome> outcome = stream.Close(absl::OkStatus(), "");
  ASSERT_TRUE(outcome.has_value());
  EXPECT_EQ(outcome->status.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(outcome->lines, 0);  // nothing was handed to the connection
  // Reported once only.
  EXPECT_FALSE(stream.ConnectionDone(false).has_value());
}

}  // namespace
}  // namespace dmdserve
