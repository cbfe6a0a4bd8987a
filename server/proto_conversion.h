// The engine's results (worker/engine.h) as the API's messages (proto/dmdserve/v1/dmdserve.proto).
//
// One conversion for every transport that speaks the native API: the gRPC service
// (image_service.h) serialises these messages as protobuf, the HTTP API's native routes
// (http_server.h, native_json.h) as protobuf JSON, so both say the same thing field for field.
// Pure functions; thread-compatible.
#ifndef DMDSERVE_SERVER_PROTO_CONVERSION_H_
#define DMDSERVE_SERVER_PROTO_CONVERSION_H_

#include <string>
#include <vector>

#include "dmdserve/v1/dmdserve.pb.h"
#include "worker/engine.h"

namespace dmdserve {

// A Generate response: every image of `result` (moved out), in index order, with the
// request-level fields and `request_id` echoed.
v1::GenerateResponse ToGenerateResponse(const std::string& request_id, GenerateResult&& result);

// One GenerateStream message: `image` (moved out) and the request-level fields known so far
// (`so_far`'s timings and truncation; the resolved `model`, `request_id` echoed).
v1::GeneratedImage ToStreamedImage(const std::string& request_id, const std::string& model,
                                   GeneratedImage&& image, const GenerateResult& so_far);

// A ListModels response: `models` in the order given.
v1::ListModelsResponse ToListModelsResponse(const std::vector<ModelInfo>& models);

// A Tokenize response (`result`'s token strings moved out).
v1::TokenizeResponse ToTokenizeResponse(TokenizeResult&& result);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_PROTO_CONVERSION_H_
