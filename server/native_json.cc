#include "server/native_json.h"

#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/util/json_util.h"
#include "nlohmann/json.hpp"
#include "server/openai_api.h"

namespace dmdserve {
namespace {

using Json = nlohmann::json;
namespace pb = google::protobuf;

// Longest unknown field name echoed in an error, in bytes.
constexpr size_t kMaxEchoedKeyBytes = 128;

// The field of `descriptor` that `key` names (proto or JSON name); null when none.
const pb::FieldDescriptor* FieldNamed(const pb::Descriptor& descriptor, const std::string& key) {
  for (int i = 0; i < descriptor.field_count(); ++i) {
    const pb::FieldDescriptor* field = descriptor.field(i);
    if (field->name() == key || field->json_name() == key) return field;
  }
  return nullptr;
}

std::string FieldNames(const pb::Descriptor& descriptor) {
  std::vector<std::string> names;
  for (int i = 0; i < descriptor.field_count(); ++i) names.push_back(descriptor.field(i)->name());
  return names.empty() ? std::string("none") : absl::StrJoin(names, ", ");
}

// Protobuf's parse errors start with the field at fault, "(num_images): invalid value ..." or
// "foo: Cannot find field."; that field, or "" when the message starts otherwise.
std::string FieldOfParseError(absl::string_view message) {
  const size_t colon = message.find(':');
  if (colon == absl::string_view::npos || colon == 0) return "";
  absl::string_view field = message.substr(0, colon);
  if (field.front() == '(' && field.back() == ')') field = field.substr(1, field.size() - 2);
  for (char c : field) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '.' && c != '[' &&
        c != ']') {
      return "";
    }
  }
  return std::string(field);
}

}  // namespace

absl::Status ParseNativeJson(absl::string_view body, pb::Message* out) {
  out->Clear();
  const pb::Descriptor& descriptor = *out->GetDescriptor();
  if (absl::StripAsciiWhitespace(body).empty()) return absl::OkStatus();
  const Json json = Json::parse(body, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request body must be a JSON object (a ", descriptor.name(), ")"));
  }
  for (const auto& item : json.items()) {
    if (FieldNamed(descriptor, item.key()) == nullptr) {
      const std::string key = item.key().substr(0, kMaxEchoedKeyBytes);
      return InvalidParam(
          key, absl::StrCat("unknown field \"", absl::CHexEscape(key), "\" in ", descriptor.name(),
                            "; its fields are ", FieldNames(descriptor)));
    }
  }
  pb::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  const auto parsed =
      pb::util::JsonStringToMessage(pb::StringPiece(body.data(), body.size()), out, options);
  if (parsed.ok()) return absl::OkStatus();
  const std::string reason(parsed.message().data(), parsed.message().size());
  const std::string message = absl::StrCat("bad ", descriptor.name(), " JSON: ", reason);
  const std::string field = FieldOfParseError(reason);
  return field.empty() ? absl::InvalidArgumentError(message) : InvalidParam(field, message);
}

absl::Status WithFieldParam(absl::Status status, const pb::Descriptor& request) {
  const std::string first = LeadingField(status);
  const pb::FieldDescriptor* field = first.empty() ? nullptr : request.FindFieldByName(first);
  return field == nullptr ? status : InvalidParam(field->name(), status.message());
}

absl::StatusOr<std::string> ToNativeJson(const pb::Message& message) {
  pb::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  std::string out;
  const auto printed = pb::util::MessageToJsonString(message, &out, options);
  if (!printed.ok()) {
    return absl::InternalError(absl::StrCat(
        "cannot print ", message.GetDescriptor()->name(),
        " as JSON: ", std::string(printed.message().data(), printed.message().size())));
  }
  return out;
}

}  // namespace dmdserve
