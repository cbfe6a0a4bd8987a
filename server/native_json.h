// The native API (proto/dmdserve/v1/dmdserve.proto) as JSON, for the HTTP API's native routes
// (http_server.h): request bodies into messages and messages into response bodies, in protobuf's
// canonical JSON mapping. Pure functions: knows nothing of sockets or libmicrohttpd
// (native_json_test.cc tests every rule). Thread-safe.
//
// Requests: a JSON object whose keys are the message's fields, by their proto name (`num_images`)
// or their JSON name (`numImages`); an empty body is `{}`. As protobuf's mapping has it: 64-bit
// integers (`seed`) as a number or a decimal string, enums by name (`"IMAGE_ENCODING_PNG"`) or
// number, `null` for "not set". An unknown field is INVALID_ARGUMENT naming it (protobuf's
// default: a misspelt `num_image` must not silently become 1 image).
// Responses: lowerCamelCase names (`truncatedTokens`), every field present even when it holds its
// default (`"index": 0`), enums by name, 64-bit integers as decimal strings (`"seed": "7"`: a
// JavaScript number cannot hold every uint64), `bytes` as standard base64 with padding.
#ifndef DMDSERVE_SERVER_NATIVE_JSON_H_
#define DMDSERVE_SERVER_NATIVE_JSON_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"

namespace dmdserve {

// Parses `body` into `out` (cleared first). INVALID_ARGUMENT when the body is not a JSON object,
// names an unknown field or holds a value of the wrong type; the status then carries the field
// (ErrorParam() in openai_api.h) where there is one.
absl::Status ParseNativeJson(absl::string_view body, google::protobuf::Message* out);

// `status` tagged (ErrorParam) with the field of `request` its message starts with, when it is an
// untagged INVALID_ARGUMENT: request validation and the engine name the field first
// ("num_images is 9; the limit is 8", "prompt: 80 tokens ..."). Any other status, or one already
// tagged, is returned as it is. (The OpenAI routes' counterpart is WithOpenAiParam.)
absl::Status WithFieldParam(absl::Status status, const google::protobuf::Descriptor& request);

// `message` as one line of JSON (no newline). INTERNAL if protobuf cannot print it (a string
// field that is not UTF-8: never the case for the server's own messages).
absl::StatusOr<std::string> ToNativeJson(const google::protobuf::Message& message);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_NATIVE_JSON_H_
