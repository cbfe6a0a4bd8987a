#include "server/request_validation.h"

#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace dmdserve {
namespace {

// Names and ids end up in log lines: printable ASCII only, so no client can forge a line.
absl::Status CheckPrintable(const std::string& field, const std::string& value) {
  for (char c : value) {
    if (!absl::ascii_isprint(static_cast<unsigned char>(c))) {
      return absl::InvalidArgumentError(absl::StrCat(field, " must be printable ASCII"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckModelName(const std::string& model, const RequestLimits& limits) {
  if (static_cast<int>(model.size()) > limits.max_model_name_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model is ", model.size(), " bytes; the limit is ", limits.max_model_name_bytes));
  }
  return CheckPrintable("model", model);
}

absl::Status CheckText(const std::string& field, const std::string& text,
                       const RequestLimits& limits) {
  if (static_cast<int>(text.size()) > limits.max_prompt_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is ", text.size(),
                                                   " bytes; the limit is ", limits.max_prompt_bytes,
                                                   " (--max_prompt_bytes)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<GenerateParams> ToGenerateParams(const v1::GenerateRequest& request,
                                                const RequestLimits& limits, absl::Time deadline) {
  if (absl::Status s = CheckModelName(request.model(), limits); !s.ok()) return s;
  if (request.prompt().empty()) return absl::InvalidArgumentError("prompt is required");
  if (absl::Status s = CheckText("prompt", request.prompt(), limits); !s.ok()) return s;
  if (request.num_images() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_images must be >= 0 (0 means 1), got ", request.num_images()));
  }
  if (request.num_images() > limits.max_images_per_request) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_images is ", request.num_images(), "; the limit is ", limits.max_images_per_request));
  }
  if (request.width() < 0 || request.height() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(request.width() < 0 ? "width" : "height",
                                                   " must be >= 0 (0 means the model default)"));
  }
  if ((request.width() == 0) != (request.height() == 0)) {
    return absl::InvalidArgumentError(
        "width and height must both be 0 (the model default) or both be set");
  }
  ImageEncoding encoding;
  switch (request.encoding()) {
    case v1::IMAGE_ENCODING_UNSPECIFIED:
    case v1::IMAGE_ENCODING_PNG:
      encoding = ImageEncoding::kPng;
      break;
    case v1::IMAGE_ENCODING_RAW:
      encoding = ImageEncoding::kRaw;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("encoding ", static_cast<int>(request.encoding()),
                       " is not a known ImageEncoding (PNG=1, RAW=2)"));
  }
  const std::string& id = request.request_id();
  if (static_cast<int>(id.size()) > limits.max_request_id_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request_id is ", id.size(), " bytes; the limit is ", limits.max_request_id_bytes));
  }
  if (absl::Status s = CheckPrintable("request_id", id); !s.ok()) return s;
  GenerateParams params;
  params.model = request.model();
  params.prompt = request.prompt();
  params.num_images = request.num_images() == 0 ? 1 : request.num_images();
  if (request.has_seed()) params.seed = request.seed();
  params.width = request.width();
  params.height = request.height();
  params.encoding = encoding;
  params.request_id = id;
  params.deadline = deadline;
  return params;
}

absl::Status ValidateTokenizeRequest(const v1::TokenizeRequest& request,
                                     const RequestLimits& limits) {
  if (absl::Status s = CheckModelName(request.model(), limits); !s.ok()) return s;
  return CheckText("text", request.text(), limits);
}

}  // namespace dmdserve
