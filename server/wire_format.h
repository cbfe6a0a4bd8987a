// Request bytes -> protobuf message with an error a client can act on, and message -> response
// bytes, for ImageGenerationService's raw (ByteBuffer) methods.
//
// gRPC 1.51's callback API answers a request it cannot deserialize by itself with UNIMPLEMENTED
// and an empty message, before any handler runs, so such requests were neither counted nor
// logged. The service therefore takes the bytes and parses them here: a request that is not a
// valid message gets INVALID_ARGUMENT saying why, naming the field where it can (a string field
// that is not UTF-8, which proto3 forbids, or a nested message that does not parse).
//
// Pure functions; thread-safe.
#ifndef DMDSERVE_SERVER_WIRE_FORMAT_H_
#define DMDSERVE_SERVER_WIRE_FORMAT_H_

#include <string>

#include <google/protobuf/message.h>
#include <grpcpp/support/byte_buffer.h>

#include "absl/status/status.h"

namespace dmdserve {

// Parses `bytes` into `message` (cleared first). INVALID_ARGUMENT naming the message type and
// the reason otherwise, e.g. "the request is not a valid dmdserve.v1.GenerateRequest: field
// 'prompt' is not valid UTF-8 (protobuf strings must be)".
absl::Status ParseRequest(const grpc::ByteBuffer& bytes, google::protobuf::Message* message);

// Why `bytes` do not parse as a message of `descriptor` (the part after the colon above); a
// generic reason when no field can be blamed. For bytes that do parse: "".
std::string DescribeParseFailure(const std::string& bytes,
                                 const google::protobuf::Descriptor* descriptor);

// Serializes `message` into `bytes`. INTERNAL if protobuf cannot (it always can for our types).
absl::Status SerializeResponse(const google::protobuf::Message& message, grpc::ByteBuffer* bytes);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_WIRE_FORMAT_H_
