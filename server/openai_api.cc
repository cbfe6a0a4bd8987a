#include "server/openai_api.h"

#include <cstdint>
#include <limits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace dmdserve {
namespace {

using Json = nlohmann::json;

// The payload key under which InvalidParam stores the field's name.
constexpr char kParamPayload[] = "type.dmdserve.dev/http.param";
// Largest width or height "WxH" may name (the engine then checks the model's sizes).
constexpr int64_t kMaxSide = 1 << 16;

// Serialises without ever throwing: invalid UTF-8 (say, echoed in an error message) is replaced.
std::string Dump(const Json& json) {
  return json.dump(-1, ' ', false, Json::error_handler_t::replace);
}

absl::Status ParseSize(const Json& size, v1::GenerateRequest& out) {
  if (size.is_null()) return absl::OkStatus();
  if (!size.is_string()) return InvalidParam("size", "size must be a string like \"64x64\"");
  const std::string text = absl::AsciiStrToLower(size.get<std::string>());
  if (text == "auto") return absl::OkStatus();
  std::vector<absl::string_view> parts = absl::StrSplit(text, 'x');
  int64_t width = 0;
  int64_t height = 0;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &width) ||
      !absl::SimpleAtoi(parts[1], &height) || width <= 0 || height <= 0 || width > kMaxSide ||
      height > kMaxSide) {
    return InvalidParam("size", absl::StrCat("size must be \"WIDTHxHEIGHT\" (e.g. \"64x64\") or "
                                             "\"auto\", got \"", text, "\""));
  }
  out.set_width(static_cast<int32_t>(width));
  out.set_height(static_cast<int32_t>(height));
  return absl::OkStatus();
}

absl::Status ParseCount(const Json& n, v1::GenerateRequest& out) {
  if (n.is_null()) return absl::OkStatus();
  if (!n.is_number_integer() || n.get<int64_t>() < 1 ||
      n.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
    return InvalidParam("n", "n must be an integer >= 1");
  }
  out.set_num_images(static_cast<int32_t>(n.get<int64_t>()));
  return absl::OkStatus();
}

absl::Status ParseSeed(const Json& seed, v1::GenerateRequest& out) {
  if (seed.is_null()) return absl::OkStatus();
  if (seed.is_number_unsigned()) {
    out.set_seed(seed.get<uint64_t>());
  } else if (seed.is_number_integer() && seed.get<int64_t>() >= 0) {
    out.set_seed(static_cast<uint64_t>(seed.get<int64_t>()));
  } else {
    return InvalidParam("seed", "seed must be an integer in [0, 2^64)");
  }
  return absl::OkStatus();
}

// response_format and output_format: the one value each that this server produces.
absl::Status CheckFormats(const Json& body) {
  const Json response_format = body.value("response_format", Json());
  if (!response_format.is_null() &&
      !(response_format.is_string() && response_format.get<std::string>() == "b64_json")) {
    return InvalidParam("response_format",
                        "response_format must be \"b64_json\": this server keeps no image files, "
                        "so it cannot answer with URLs");
  }
  const Json output_format = body.value("output_format", Json());
  if (!output_format.is_null() &&
      !(output_format.is_string() && output_format.get<std::string>() == "png")) {
    return InvalidParam("output_format", "output_format must be \"png\" (the only format served)");
  }
  return absl::OkStatus();
}

absl::Status ParseModel(const Json& model, const ModelAliases& aliases, v1::GenerateRequest& out) {
  if (model.is_null()) return absl::OkStatus();
  if (!model.is_string()) return InvalidParam("model", "model must be a string");
  std::string name = model.get<std::string>();
  if (auto it = aliases.find(name); it != aliases.end()) name = it->second;
  out.set_model(std::move(name));
  return absl::OkStatus();
}

// `status` (a canonical code's name) is added when not empty.
HttpError ErrorOf(int http_status, absl::string_view type, absl::string_view code,
                  absl::string_view message, absl::string_view param, absl::string_view status) {
  Json error = {{"message", std::string(message)},
                {"type", std::string(type)},
                {"param", param.empty() ? Json() : Json(std::string(param))},
                {"code", code.empty() ? Json() : Json(std::string(code))}};
  if (!status.empty()) error["status"] = std::string(status);
  return {http_status, Dump({{"error", std::move(error)}})};
}

}  // namespace

absl::StatusOr<ModelAliases> ParseModelAliases(absl::string_view text) {
  ModelAliases aliases;
  for (absl::string_view entry : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    entry = absl::StripAsciiWhitespace(entry);
    std::pair<absl::string_view, absl::string_view> sides = absl::StrSplit(entry, '=');
    const absl::string_view alias = absl::StripAsciiWhitespace(sides.first);
    const absl::string_view target = absl::StripAsciiWhitespace(sides.second);
    if (entry.find('=') == absl::string_view::npos || alias.empty() || target.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model alias '", entry, "' is not ALIAS=MODEL"));
    }
    if (!aliases.emplace(alias, target).second) {
      return absl::InvalidArgumentError(absl::StrCat("model alias '", alias, "' given twice"));
    }
  }
  return aliases;
}

absl::StatusOr<ImagesRequest> ParseImagesRequest(absl::string_view body,
                                                 const ModelAliases& aliases) {
  const Json json = Json::parse(body, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) {
    return absl::InvalidArgumentError("the request body must be a JSON object");
  }
  ImagesRequest out;
  v1::GenerateRequest& request = out.request;
  const Json prompt = json.value("prompt", Json());
  if (!prompt.is_string()) return InvalidParam("prompt", "prompt is required and must be a string");
  request.set_prompt(prompt.get<std::string>());
  request.set_encoding(v1::IMAGE_ENCODING_PNG);
  if (absl::Status s = ParseModel(json.value("model", Json()), aliases, request); !s.ok()) return s;
  if (absl::Status s = ParseCount(json.value("n", Json()), request); !s.ok()) return s;
  if (absl::Status s = ParseSize(json.value("size", Json()), request); !s.ok()) return s;
  if (absl::Status s = ParseSeed(json.value("seed", Json()), request); !s.ok()) return s;
  if (absl::Status s = CheckFormats(json); !s.ok()) return s;
  const Json user = json.value("user", Json());
  if (!user.is_null() && !user.is_string()) return InvalidParam("user", "user must be a string");
  if (user.is_string()) out.user = user.get<std::string>();
  return out;
}

std::string ImagesResponseJson(const GenerateResult& result, absl::Time created) {
  Json data = Json::array();
  for (const GeneratedImage& image : result.images) {
    data.push_back({{"b64_json", absl::Base64Escape(image.data)}, {"seed", image.seed}});
  }
  return Dump({{"created", absl::ToUnixSeconds(created)}, {"data", std::move(data)}});
}

std::string ModelsResponseJson(const std::vector<ModelInfo>& models, absl::Time created) {
  Json data = Json::array();
  for (const ModelInfo& model : models) {
    data.push_back({{"id", model.name},
                    {"object", "model"},
                    {"created", absl::ToUnixSeconds(created)},
                    {"owned_by", "dmdserve"}});
  }
  return Dump({{"object", "list"}, {"data", std::move(data)}});
}

absl::Status InvalidParam(absl::string_view param, absl::string_view message) {
  absl::Status status = absl::InvalidArgumentError(message);
  status.SetPayload(kParamPayload, absl::Cord(param));
  return status;
}

std::string ErrorParam(const absl::Status& status) {
  const auto param = status.GetPayload(kParamPayload);
  return param.has_value() ? std::string(*param) : std::string();
}

std::string LeadingField(const absl::Status& status) {
  if (status.code() != absl::StatusCode::kInvalidArgument || !ErrorParam(status).empty()) {
    return "";
  }
  const absl::string_view message = status.message();
  return std::string(message.substr(0, message.find_first_of(" :")));
}

absl::Status WithOpenAiParam(absl::Status status) {
  static constexpr std::pair<absl::string_view, absl::string_view> kParams[] = {
      {"prompt", "prompt"}, {"model", "model"}, {"num_images", "n"},
      {"width", "size"},    {"height", "size"}};
  const std::string field = LeadingField(status);
  for (const auto& [grpc_field, param] : kParams) {
    if (field == grpc_field) return InvalidParam(param, status.message());
  }
  return status;
}

HttpError MakeHttpError(int http_status, absl::string_view type, absl::string_view code,
                        absl::string_view message, absl::string_view status) {
  return ErrorOf(http_status, type, code, message, "", status);
}

HttpError ToHttpError(const absl::Status& status, ErrorStyle style) {
  struct Mapping {
    int http_status;
    absl::string_view type;
    absl::string_view code;
  };
  const Mapping m = [&]() -> Mapping {
    switch (status.code()) {
      case absl::StatusCode::kInvalidArgument:
      case absl::StatusCode::kOutOfRange:
      case absl::StatusCode::kFailedPrecondition:
        return {400, "invalid_request_error", "invalid_value"};
      case absl::StatusCode::kUnauthenticated:
        return {401, "invalid_request_error", "invalid_api_key"};
      case absl::StatusCode::kPermissionDenied:
        return {403, "invalid_request_error", "permission_denied"};
      case absl::StatusCode::kNotFound:
        return {404, "invalid_request_error", "model_not_found"};
      case absl::StatusCode::kResourceExhausted:
        return {429, "rate_limit_error", "rate_limit_exceeded"};
      case absl::StatusCode::kCancelled:
      case absl::StatusCode::kUnavailable:
        return {503, "server_error", "unavailable"};
      case absl::StatusCode::kDeadlineExceeded:
        return {504, "server_error", "timeout"};
      case absl::StatusCode::kUnimplemented:
        return {501, "server_error", "unimplemented"};
      default:
        return {500, "server_error", "internal_error"};
    }
  }();
  const std::string code_name =
      style == ErrorStyle::kNative ? absl::StatusCodeToString(status.code()) : std::string();
  return ErrorOf(m.http_status, m.type, m.code, status.message(), ErrorParam(status), code_name);
}

}  // namespace dmdserve
