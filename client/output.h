// Pure output helpers of dmdctl: image file names, the JSON documents and text of each command,
// and the assembly of a streamed response. No I/O; all functions are thread-safe.
//
// JSON documents are nlohmann::ordered_json so that keys print in the documented order
// (docs/CLIENT.md); print them with DumpJson.
#ifndef DMDSERVE_CLIENT_OUTPUT_H_
#define DMDSERVE_CLIENT_OUTPUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "dmdserve/v1/dmdserve.pb.h"
#include "nlohmann/json.hpp"

namespace dmdserve::client {

// "<prefix>-<index>-seed<seed>.png", or ".raw" for IMAGE_ENCODING_RAW.
std::string ImageFileName(absl::string_view prefix, int index, uint64_t seed,
                          v1::ImageEncoding encoding);

// The GenerateResponse equivalent of a streamed generation, from its images in arrival order
// (each streamed image carries model, request_id, truncated_tokens and its own timings). Images
// come out in index order. Timings are aggregated as the unary response defines them:
// queue_seconds the smallest, stage times and total_seconds those of the image that finished last
// (largest total_seconds), encode_seconds the sum, batch_size the largest.
v1::GenerateResponse AssembleStreamResponse(std::vector<v1::GeneratedImage> images);

// `generate --json`: {"model", "request_id", "images": [{"index", "seed", "width", "height",
// "channels", "path"[, "timings" when streamed]}], "timings": {...server timings,
// "client_seconds"}, "truncated_tokens"}. paths[i] is where response.images(i) was written.
nlohmann::ordered_json GenerateJson(const v1::GenerateResponse& response,
                                    const std::vector<std::string>& paths, double client_seconds);

// `generate` without --json: a few human-readable lines.
std::string GenerateText(const v1::GenerateResponse& response,
                         const std::vector<std::string>& paths, double client_seconds);

// `models --json`: {"models": [{"name", "is_default", "ready", "width", "height", "channels",
// "steps", "max_images_per_request", "max_tokens", "supported_sizes": [{"width", "height"}],
// "description"}]}.
nlohmann::ordered_json ModelsJson(const v1::ListModelsResponse& response);

// `models` without --json: a table with one row per model.
std::string ModelsTable(const v1::ListModelsResponse& response);

// `tokenize --json`: exactly {"ids", "tokens", "input_ids", "truncated_tokens"}.
nlohmann::ordered_json TokenizeJson(const v1::TokenizeResponse& response);

// `tokenize` without --json: one row per id (position, id, token), then the model input's layout.
std::string TokenizeText(const v1::TokenizeResponse& response);

// The stderr warning for a prompt cut by the model's token limit; "" when truncated_tokens is 0.
std::string TruncationWarning(int truncated_tokens);

// Left-aligned columns separated by two spaces, one line per row; rows may differ in length.
std::string FormatTable(const std::vector<std::vector<std::string>>& rows);

// Compact one-line JSON. Invalid UTF-8 in strings is replaced by U+FFFD instead of throwing.
std::string DumpJson(const nlohmann::ordered_json& json);

}  // namespace dmdserve::client

#endif  // DMDSERVE_CLIENT_OUTPUT_H_
