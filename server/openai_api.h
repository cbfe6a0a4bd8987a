// The OpenAI-compatible JSON of the HTTP API (server/http_server.h), as pure functions: request
// bodies into the gRPC API's request (then validated by request_validation.h, like a gRPC call),
// results and statuses into response bodies. Knows nothing of sockets or libmicrohttpd, so that
// every conversion is unit-tested (openai_api_test.cc).
//
// POST /v1/images/generations accepts (unknown fields are ignored, as OpenAI's API does):
//   prompt          string, required
//   model           string; absent or null: the default model. An alias (--http_model_aliases,
//                   e.g. gpt-image-1=fashion-dmd) is replaced by its target before resolution
//   n               integer >= 1; absent: 1
//   size            "WxH" (a size the model supports) or "auto"; absent: the model's default
//   response_format "b64_json" only ("url" is refused: the server keeps no files)
//   output_format   "png" only
//   user            string, logged
//   seed            extension: unsigned integer, image i uses seed + i (as in the gRPC API)
// and answers {"created": <unix seconds>, "data": [{"b64_json": <PNG base64>, "seed": <uint>}]}.
// Every error is {"error": {"message", "type", "param", "code"}} with the HTTP status of its
// canonical code (ToHttpError: the one place where absl::Status becomes an HTTP status; the native
// routes' errors, native_json.h, add "status").
#ifndef DMDSERVE_SERVER_OPENAI_API_H_
#define DMDSERVE_SERVER_OPENAI_API_H_

#include <map>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dmdserve/v1/dmdserve.pb.h"
#include "worker/engine.h"

namespace dmdserve {

// Model aliases, alias -> served model name.
using ModelAliases = std::map<std::string, std::string, std::less<>>;

// Parses `alias=model,alias=model` (the --http_model_aliases syntax); INVALID_ARGUMENT naming the
// bad entry (no `=`, an empty side, a duplicate alias). Empty text: no aliases.
absl::StatusOr<ModelAliases> ParseModelAliases(absl::string_view text);

// A parsed POST /v1/images/generations body.
struct ImagesRequest {
  // The equivalent gRPC request (model: alias already replaced; encoding PNG). Not yet validated
  // against RequestLimits: pass it to ToGenerateParams.
  v1::GenerateRequest request;
  // The `user` field, for the log line (empty when absent).
  std::string user;
};

// The body's fields as described above; INVALID_ARGUMENT for a body that is not a JSON object, a
// field of the wrong type or value (the status carries the field's name: ErrorParam()).
absl::StatusOr<ImagesRequest> ParseImagesRequest(absl::string_view body,
                                                 const ModelAliases& aliases);

// The success body of POST /v1/images/generations: `result`'s images in index order.
std::string ImagesResponseJson(const GenerateResult& result, absl::Time created);

// GET /v1/models: every served model as an OpenAI model object, created at `created`.
std::string ModelsResponseJson(const std::vector<ModelInfo>& models, absl::Time created);

// A status tagged with the request field at fault (reported as the error's `param`).
absl::Status InvalidParam(absl::string_view param, absl::string_view message);
// The field a status was tagged with by InvalidParam; empty when none.
std::string ErrorParam(const absl::Status& status);

// The field an untagged INVALID_ARGUMENT is about, by the gRPC API's convention that request
// validation and the engine name the field first ("num_images is 9; ...", "prompt: 80 tokens
// ..."): the message's first word. Empty for any other status, or one already tagged.
std::string LeadingField(const absl::Status& status);

// `status` tagged with the OpenAI parameter it is about, when it is an untagged INVALID_ARGUMENT
// from request validation or the engine: their messages name the gRPC field first (the gRPC
// API's convention), mapped here to OpenAI's names: prompt, model, num_images -> n, width and
// height -> size. Any other status, or one already tagged, is returned as it is.
absl::Status WithOpenAiParam(absl::Status status);

// An error as the HTTP API reports it.
struct HttpError {
  int http_status = 500;
  std::string body;  // {"error": {...}}
};

// Which routes an error answers: the OpenAI-compatible ones get exactly OpenAI's error object; the
// native API's (POST /v1/generate, ...) get the same object plus `status`, the canonical code's
// name ("INVALID_ARGUMENT", ...), i.e. what the gRPC API returns for the same failure.
enum class ErrorStyle { kOpenAi, kNative };

// The HTTP status, OpenAI error type and code of a non-OK status: INVALID_ARGUMENT,
// OUT_OF_RANGE and FAILED_PRECONDITION 400 (invalid_request_error), UNAUTHENTICATED 401,
// PERMISSION_DENIED 403, NOT_FOUND 404 (model_not_found), RESOURCE_EXHAUSTED 429
// (rate_limit_exceeded), CANCELLED and UNAVAILABLE 503, DEADLINE_EXCEEDED 504, UNIMPLEMENTED
// 501, anything else 500 (server_error). The one place where an absl::Status becomes an HTTP
// status, for every route of the HTTP port.
HttpError ToHttpError(const absl::Status& status, ErrorStyle style = ErrorStyle::kOpenAi);

// An error body for conditions that have no canonical code (413 body too large, 405, 404 path).
// `status` (a canonical code's name; empty: none) is added as the native routes' `status`.
HttpError MakeHttpError(int http_status, absl::string_view type, absl::string_view code,
                        absl::string_view message, absl::string_view status = "");

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_OPENAI_API_H_
