// Structure-aware mutation for request_fuzzer (libFuzzer's LLVMFuzzerCustomMutator).
//
// Debian 12 packages no libprotobuf-mutator, so this mutates messages with protobuf reflection:
// about half of the mutations parse the input's request bytes as the RPC's message, change one
// field to a value chosen near a limit the server enforces (empty, at the limit, one past it,
// negative, huge, non-printable, an unknown enum value, a missing optional) and serialize it
// again; the others are libFuzzer's byte-level mutations of the whole input, of the request
// bytes alone (which produce what no valid message can: truncated fields, bad lengths, invalid
// UTF-8) or of the method and credential bits. Both kinds reach every branch of validation
// quickly: byte mutations alone rarely keep a message parseable while moving a field to 4097.
#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>
#include <google/protobuf/reflection.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>

#include "dmdserve/v1/dmdserve.pb.h"
#include "tests/fuzz/request_input.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace dmdserve::fuzz {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;
using Rng = std::minstd_rand;

// Lengths around the server's limits: prompt/text 4096, request_id 128, model name 256.
size_t InterestingLength(Rng& rng) {
  static constexpr size_t kLengths[] = {0, 1, 77, 127, 128, 129, 255, 256, 257, 4095, 4096, 4097};
  return kLengths[rng() % (sizeof(kLengths) / sizeof(kLengths[0]))];
}

// Integers around the limits: num_images 0..64 (a model allows fewer), sizes, enum values.
int64_t InterestingInt(Rng& rng) {
  static constexpr int64_t kValues[] = {0,  1,       2,         3,         8,         9,
                                        28, 32,      48,        63,        64,        65,
                                        -1, 1 << 20, INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN};
  return kValues[rng() % (sizeof(kValues) / sizeof(kValues[0]))];
}

std::string MutateString(std::string value, Rng& rng) {
  static constexpr const char* kWords[] = {"fake-dmd",     "fake-teacher", "a photo of a cat",
                                           "id-1",         "\xC3\xA9",     "\xF0\x9F\x98\x80",
                                           "<|endoftext|>"};
  switch (rng() % 5) {
    case 0:  // a length at or around a limit
      return std::string(InterestingLength(rng), "ax \x7f"[rng() % 4]);
    case 1:  // a known name or a multi-byte character
      return kWords[rng() % (sizeof(kWords) / sizeof(kWords[0]))];
    case 2:  // one control character inside
      value.insert(rng() % (value.size() + 1), 1, static_cast<char>(rng() % 32));
      return value;
    case 3:  // libFuzzer's byte mutations of the value (may break UTF-8)
      value.resize(value.size() + 16);
      value.resize(LLVMFuzzerMutate(reinterpret_cast<uint8_t*>(value.data()), value.size() - 16,
                                    value.size()));
      return value;
    default:
      return "";
  }
}

// Sets one scalar field of `message` to a value near a limit (or clears it).
void MutateField(Message* message, Rng& rng) {
  const auto* descriptor = message->GetDescriptor();
  if (descriptor->field_count() == 0) return;
  const FieldDescriptor* field = descriptor->field(rng() % descriptor->field_count());
  const Reflection* reflection = message->GetReflection();
  if (rng() % 8 == 0) {
    reflection->ClearField(message, field);  // also makes an optional field absent
    return;
  }
  switch (field->cpp_type()) {
    case FieldDescriptor::CPPTYPE_STRING:
      reflection->SetString(message, field,
                            MutateString(reflection->GetString(*message, field), rng));
      break;
    case FieldDescriptor::CPPTYPE_INT32:
      reflection->SetInt32(message, field, static_cast<int32_t>(InterestingInt(rng)));
      break;
    case FieldDescriptor::CPPTYPE_UINT64:
      reflection->SetUInt64(message, field, static_cast<uint64_t>(InterestingInt(rng)));
      break;
    case FieldDescriptor::CPPTYPE_ENUM:
      reflection->SetEnumValue(message, field, static_cast<int>(rng() % 5) - 1);
      break;
    default:
      break;
  }
}

// A field-level mutation of `in.wire`; false when the bytes do not parse as the RPC's message.
bool MutateMessage(RequestInput& in, Rng& rng) {
  std::unique_ptr<Message> message = RequestInput::NewMessage(in.method);
  if (!message->ParseFromString(in.wire)) return false;
  const int rounds = 1 + static_cast<int>(rng() % 3);
  for (int i = 0; i < rounds; ++i) MutateField(message.get(), rng);
  in.wire = message->SerializeAsString();
  return true;
}

void MutateWireBytes(RequestInput& in, size_t max_size) {
  const size_t size = in.wire.size();
  in.wire.resize(std::max(max_size, size + 1));
  in.wire.resize(
      LLVMFuzzerMutate(reinterpret_cast<uint8_t*>(in.wire.data()), size, in.wire.size()));
}

void MutateCredentials(RequestInput& in, Rng& rng) {
  if (rng() % 2 == 0) {
    in.method = static_cast<RequestInput::Method>(rng() % 4);
    return;
  }
  in.auth = static_cast<RequestInput::Auth>(rng() % 4);
  if (in.auth == RequestInput::Auth::kFromInput && rng() % 2 == 0) {
    static constexpr const char* kValues[] = {"Bearer ", "bearer fuzz-open-secret ",
                                              "Bearer fuzz-open-secre", "Basic x", ""};
    in.authorization = kValues[rng() % (sizeof(kValues) / sizeof(kValues[0]))];
  }
}

}  // namespace
}  // namespace dmdserve::fuzz

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  using dmdserve::fuzz::RequestInput;
  dmdserve::fuzz::Rng rng(seed);
  const unsigned choice = rng() % 10;
  if (choice < 3) return LLVMFuzzerMutate(data, size, max_size);
  RequestInput in = RequestInput::Decode(data, size);
  if (choice < 8) {
    if (!dmdserve::fuzz::MutateMessage(in, rng)) {
      dmdserve::fuzz::MutateWireBytes(in, max_size / 2);
    }
  } else if (choice < 9) {
    dmdserve::fuzz::MutateWireBytes(in, max_size / 2);
  } else {
    dmdserve::fuzz::MutateCredentials(in, rng);
  }
  const std::string out = in.Encode();
  if (out.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::memcpy(data, out.data(), out.size());
  return out.size();
}
