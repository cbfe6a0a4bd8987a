#include "server/wire_format.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/support/slice.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "worker/text_cleanup.h"

namespace dmdserve {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::UnknownField;
using google::protobuf::UnknownFieldSet;

// Protobuf's own nesting limit: deeper input is refused as malformed.
constexpr int kMaxDepth = 100;

std::string Flatten(const grpc::ByteBuffer& bytes) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!bytes.Dump(&slices).ok()) return out;
  for (const grpc::Slice& slice : slices) {
    out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return out;
}

bool IsUtf8(const std::string& text) {
  std::u32string decoded;
  return text_cleanup::DecodeUtf8(text, &decoded).ok();
}

std::string Describe(const std::string& bytes, const Descriptor* descriptor, int depth) {
  UnknownFieldSet fields;
  if (depth > kMaxDepth || !fields.ParseFromString(bytes)) {
    return "not valid protobuf wire format (truncated, a length past the end, a bad tag or "
           "nesting too deep)";
  }
  for (int i = 0; i < fields.field_count(); ++i) {
    const UnknownField& field = fields.field(i);
    const FieldDescriptor* fd = descriptor->FindFieldByNumber(field.number());
    if (fd == nullptr || field.type() != UnknownField::TYPE_LENGTH_DELIMITED) continue;
    const std::string& value = field.length_delimited();
    if (fd->type() == FieldDescriptor::TYPE_STRING && !IsUtf8(value)) {
      return absl::StrCat("field '", fd->name(), "' is not valid UTF-8 (protobuf strings must be)");
    }
    if (fd->type() == FieldDescriptor::TYPE_MESSAGE) {
      const std::string nested = Describe(value, fd->message_type(), depth + 1);
      if (!nested.empty()) return absl::StrCat("field '", fd->name(), "': ", nested);
    }
  }
  return "";
}

}  // namespace

std::string DescribeParseFailure(const std::string& bytes, const Descriptor* descriptor) {
  return Describe(bytes, descriptor, 0);
}

absl::Status ParseRequest(const grpc::ByteBuffer& bytes, google::protobuf::Message* message) {
  const std::string flat = Flatten(bytes);
  if (message->ParseFromString(flat)) return absl::OkStatus();
  std::string reason = DescribeParseFailure(flat, message->GetDescriptor());
  if (reason.empty()) reason = "it could not be parsed";
  return absl::InvalidArgumentError(absl::StrCat(
      "the request is not a valid ", message->GetDescriptor()->full_name(), ": ", reason));
}

absl::Status SerializeResponse(const google::protobuf::Message& message, grpc::ByteBuffer* bytes) {
  std::string serialized;
  if (!message.SerializeToString(&serialized)) {
    return absl::InternalError(
        absl::StrCat("cannot serialize a ", message.GetDescriptor()->full_name()));
  }
  grpc::Slice slice(std::move(serialized));
  *bytes = grpc::ByteBuffer(&slice, 1);
  return absl::OkStatus();
}

}  // namespace dmdserve
