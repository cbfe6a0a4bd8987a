// HttpStream: the body of one streamed HTTP response (POST /v1/generate:stream), fed line by line
// from the backend's threads and sent with chunked transfer encoding by libmicrohttpd's daemon
// thread as the lines arrive.
//
// The daemon thread never waits for a line: when it has nothing to send, the connection is
// suspended (MHD_suspend_connection) and the next AddLine() or Close() resumes it. The same holds
// before the response starts: the status line is only sent with the first line, so that a request
// that fails before producing anything still gets an ordinary error response with its HTTP
// status (Start() says which). A failure after the first line can no longer change the status:
// Close() then appends its error line, and the body ends normally after it.
//
// Bookkeeping: once the response started, the request ends when both the backend closed the
// stream and the connection is done (sent in full, or the client went away); whichever of Close()
// and ConnectionDone() comes last returns the request's Outcome, exactly once.
//
// Thread-safe. The connection is only touched while it is known to be alive: suspended by this
// stream (libmicrohttpd does not close a suspended connection) or from the daemon thread's own
// callbacks.
#ifndef DMDSERVE_SERVER_HTTP_STREAM_H_
#define DMDSERVE_SERVER_HTTP_STREAM_H_

#include <atomic>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

struct MHD_Connection;  // <microhttpd.h>
struct MHD_Response;

namespace dmdserve {

class HttpStream {
 public:
  // How a started stream ended: the backend's status, or CANCELLED when the client went away
  // before the body was sent in full; `lines`: the lines (images) handed to the connection in
  // full, error line excluded.
  struct Outcome {
    absl::Status status;
    int lines = 0;
  };

  // `connection` carries the response; it must stay open until ConnectionDone().
  explicit HttpStream(MHD_Connection* connection) : connection_(connection) {}

  HttpStream(const HttpStream&) = delete;
  HttpStream& operator=(const HttpStream&) = delete;

  // Backend side (any thread; the calls are serialised and Close() comes last, once).
  // Appends `line` and a newline; resumes the connection if it waits.
  void AddLine(std::string line);
  // The end of the stream: `status` is the backend's; `error_line` (without newline) is sent
  // when the status is not OK and lines were added (otherwise Start() reports the error).
  std::optional<Outcome> Close(const absl::Status& status, std::string error_line);

  // Daemon side (libmicrohttpd's callbacks).
  // Before the response starts: suspends the connection until the first AddLine() or Close(),
  // unless one already came. True when it suspended (the caller returns and is called again once
  // the connection resumes).
  bool SuspendUntilFirstEvent();
  // Decides the response once the first event came: OK to stream (a 200 with CreateResponse()),
  // or the error to answer instead (Close() with an error before any line).
  absl::Status Start();
  // The chunked response reading from `stream` (Start() returned OK); null when out of memory.
  static MHD_Response* CreateResponse(std::shared_ptr<HttpStream> stream);
  // The request's connection is done: `completed` when the response was sent in full.
  std::optional<Outcome> ConnectionDone(bool completed);

  // True once the connection closed before the body was sent (polled as is_cancelled).
  bool client_gone() const { return client_gone_.load(); }

  // libmicrohttpd's content reader: up to `max` bytes into `buf`, or suspends and returns 0, or
  // the end of the stream (MHD_CONTENT_READER_END_OF_STREAM).
  ssize_t Read(char* buf, size_t max);

 private:
  // The Outcome, if the response started and both ends are done; at most once.
  std::optional<Outcome> OutcomeIfDone() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes the suspension, if any: the caller must then resume the connection (without mu_).
  bool TakeSuspension() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  MHD_Connection* const connection_;
  std::atomic<bool> client_gone_{false};
  absl::Mutex mu_;
  std::string pending_ ABSL_GUARDED_BY(mu_);  // bytes not yet handed to the connection
  size_t offset_ ABSL_GUARDED_BY(mu_) = 0;    // of pending_, handed already
  int lines_added_ ABSL_GUARDED_BY(mu_) = 0;
  int lines_sent_ ABSL_GUARDED_BY(mu_) = 0;
  bool suspended_ ABSL_GUARDED_BY(mu_) = false;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  bool connection_done_ ABSL_GUARDED_BY(mu_) = false;
  bool completed_ ABSL_GUARDED_BY(mu_) = false;
  bool reported_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_HTTP_STREAM_H_
