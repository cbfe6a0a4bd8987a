#include "server/http_stream.h"

#include <microhttpd.h>

#include <algorithm>
#include <cstring>
#include <utility>

namespace dmdserve {
namespace {

// Bytes libmicrohttpd asks the reader for at once (each read becomes one chunk).
constexpr size_t kReadBlockBytes = 32 << 10;

ssize_t ReadStream(void* cls, uint64_t /*pos*/, char* buf, size_t max) {
  return (*static_cast<std::shared_ptr<HttpStream>*>(cls))->Read(buf, max);
}

void FreeStream(void* cls) { delete static_cast<std::shared_ptr<HttpStream>*>(cls); }

}  // namespace

void HttpStream::AddLine(std::string line) {
  bool resume = false;
  {
    absl::MutexLock lock(&mu_);
    pending_.append(line);
    pending_.push_back('\n');
    ++lines_added_;
    resume = TakeSuspension();
  }
  if (resume) MHD_resume_connection(connection_);
}

std::optional<HttpStream::Outcome> HttpStream::Close(const absl::Status& status,
                                                     std::string error_line) {
  bool resume = false;
  std::optional<Outcome> outcome;
  {
    absl::MutexLock lock(&mu_);
    closed_ = true;
    status_ = status;
    if (!status.ok() && lines_added_ > 0) {
      pending_.append(error_line);
      pending_.push_back('\n');
    }
    resume = TakeSuspension();
    outcome = OutcomeIfDone();
  }
  if (resume) MHD_resume_connection(connection_);
  return outcome;
}

bool HttpStream::SuspendUntilFirstEvent() {
  absl::MutexLock lock(&mu_);
  if (lines_added_ > 0 || closed_) return false;
  suspended_ = true;
  MHD_suspend_connection(connection_);
  return true;
}

absl::Status HttpStream::Start() {
  absl::MutexLock lock(&mu_);
  if (lines_added_ == 0 && closed_ && !status_.ok()) return status_;
  started_ = true;
  return absl::OkStatus();
}

MHD_Response* HttpStream::CreateResponse(std::shared_ptr<HttpStream> stream) {
  auto* holder = new std::shared_ptr<HttpStream>(std::move(stream));
  MHD_Response* response = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, kReadBlockBytes,
                                                             &ReadStream, holder, &FreeStream);
  if (response == nullptr) delete holder;
  return response;
}

std::optional<HttpStream::Outcome> HttpStream::ConnectionDone(bool completed) {
  if (!completed) client_gone_.store(true);
  absl::MutexLock lock(&mu_);
  connection_done_ = true;
  completed_ = completed;
  return OutcomeIfDone();
}

ssize_t HttpStream::Read(char* buf, size_t max) {
  absl::MutexLock lock(&mu_);
  if (offset_ < pending_.size()) {
    const size_t n = std::min(max, pending_.size() - offset_);
    std::memcpy(buf, pending_.data() + offset_, n);
    lines_sent_ += static_cast<int>(std::count(buf, buf + n, '\n'));
    lines_sent_ = std::min(lines_sent_, lines_added_);  // the error line is no image
    offset_ += n;
    if (offset_ == pending_.size()) {
      pending_.clear();
      offset_ = 0;
    }
    return static_cast<ssize_t>(n);
  }
  if (closed_) return MHD_CONTENT_READER_END_OF_STREAM;
  // Nothing to send yet: wait, suspended, for AddLine() or Close().
  suspended_ = true;
  MHD_suspend_connection(connection_);
  return 0;
}

bool HttpStream::TakeSuspension() {
  const bool was = suspended_;
  suspended_ = false;
  return was;
}

std::optional<HttpStream::Outcome> HttpStream::OutcomeIfDone() {
  if (!started_ || !closed_ || !connection_done_ || reported_) return std::nullopt;
  reported_ = true;
  Outcome outcome{status_, lines_sent_};
  if (!completed_ && status_.ok()) {
    outcome.status = absl::CancelledError("the client went away before the stream was sent");
  }
  return outcome;
}

}  // namespace dmdserve
