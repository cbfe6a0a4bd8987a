// The HTTP API's routes (http_server.h): which path is which API call, which HTTP methods it
// takes, how it is counted and how its errors look. Pure lookups over a constant table;
// thread-safe.
#ifndef DMDSERVE_SERVER_HTTP_ROUTES_H_
#define DMDSERVE_SERVER_HTTP_ROUTES_H_

#include <string>

#include "absl/strings/string_view.h"
#include "server/metrics.h"
#include "server/openai_api.h"

namespace dmdserve {

enum class HttpCall {
  kImagesGenerations,  // POST /v1/images/generations   OpenAI's image generation
  kOpenAiModels,       // GET  /v1/models               OpenAI's model list
  kGenerate,           // POST /v1/generate             Generate, GenerateRequest JSON
  kGenerateStream,     // POST /v1/generate:stream      GenerateStream, NDJSON of GeneratedImage
  kListModels,         // POST /v1/models:list          ListModels
  kTokenize,           // POST /v1/tokenize             Tokenize
};

struct HttpRoute {
  absl::string_view path;
  HttpCall call;
  RpcMethod method;  // its metrics label and log name
  // The methods it answers, as the Allow header lists them; "GET, HEAD" or "POST".
  const char* allow;
  ErrorStyle errors;
};

// The API route at `path` (exact match); null when none.
const HttpRoute* FindHttpRoute(absl::string_view path);

// Whether `route` answers the HTTP method `verb`.
bool Allows(const HttpRoute& route, absl::string_view verb);

// Every API path, for the message of a 404 ("/v1/images/generations, /v1/models, ...").
std::string HttpRoutePaths();

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_HTTP_ROUTES_H_
