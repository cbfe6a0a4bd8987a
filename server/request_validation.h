// Validation of wire requests and their conversion into worker/ native types.
//
// Checks everything that does not depend on a model (the engine checks the rest: model name,
// num_images against the model's limit, supported sizes, prompt encoding). Every error is
// INVALID_ARGUMENT and its message names the field and the limit. Pure functions.
#ifndef DMDSERVE_SERVER_REQUEST_VALIDATION_H_
#define DMDSERVE_SERVER_REQUEST_VALIDATION_H_

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dmdserve/v1/dmdserve.pb.h"
#include "worker/engine.h"

namespace dmdserve {

struct RequestLimits {
  // Longest prompt / tokenize text, in bytes. Default 4096.
  int max_prompt_bytes = 4096;
  // Longest request_id, in bytes. Default 128.
  int max_request_id_bytes = 128;
  // Longest model name, in bytes. Default 256.
  int max_model_name_bytes = 256;
  // Largest num_images the server accepts before asking the model (the engine applies the
  // model's own, possibly lower, limit). Default 64.
  int max_images_per_request = 64;
};

absl::StatusOr<GenerateParams> ToGenerateParams(const v1::GenerateRequest& request,
                                                const RequestLimits& limits, absl::Time deadline);

absl::Status ValidateTokenizeRequest(const v1::TokenizeRequest& request,
                                     const RequestLimits& limits);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_REQUEST_VALIDATION_H_
