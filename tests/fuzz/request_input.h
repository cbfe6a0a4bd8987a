// The layout of one request_fuzzer input: which RPC, which credentials, and the request bytes.
//
//   byte 0        bits 0-1: the RPC (RequestInput::Method); bits 2-3: the credentials (Auth)
//   byte 1        length N of the authorization value that follows (used with Auth::kFromInput)
//   bytes 2..N+1  the authorization metadata value
//   the rest      the request message's wire bytes, sent as they are
//
// Shared by the fuzzer (request_fuzzer.cc), its structure-aware mutator (request_mutator.cc) and
// the seed-corpus generator (make_request_corpus.py writes the same layout). Header-only; pure.
#ifndef DMDSERVE_TESTS_FUZZ_REQUEST_INPUT_H_
#define DMDSERVE_TESTS_FUZZ_REQUEST_INPUT_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "dmdserve/v1/dmdserve.pb.h"

namespace dmdserve::fuzz {

struct RequestInput {
  enum class Method : uint8_t {
    kGenerate = 0,
    kGenerateStream = 1,
    kTokenize = 2,
    kListModels = 3
  };
  enum class Auth : uint8_t {
    kUnlimitedKey = 0,  // "Bearer <secret of a key without a rate limit>"
    kLimitedKey = 1,    // "Bearer <secret of a key limited to a few images per second>"
    kFromInput = 2,     // `authorization` as given (made printable: gRPC refuses other bytes)
    kNone = 3,          // no authorization metadata
  };
  static constexpr size_t kMaxAuthorization = 255;

  Method method = Method::kGenerate;
  Auth auth = Auth::kUnlimitedKey;
  std::string authorization;
  std::string wire;

  // Any bytes decode: missing parts are empty.
  static RequestInput Decode(const uint8_t* data, size_t size) {
    RequestInput in;
    if (size == 0) return in;
    in.method = static_cast<Method>(data[0] & 3);
    in.auth = static_cast<Auth>((data[0] >> 2) & 3);
    if (size == 1) return in;
    const size_t length = std::min<size_t>(data[1], size - 2);
    in.authorization.assign(reinterpret_cast<const char*>(data + 2), length);
    in.wire.assign(reinterpret_cast<const char*>(data + 2 + length), size - 2 - length);
    return in;
  }

  std::string Encode() const {
    const size_t length = std::min(authorization.size(), kMaxAuthorization);
    std::string out;
    out.push_back(
        static_cast<char>(static_cast<uint8_t>(method) | (static_cast<uint8_t>(auth) << 2)));
    out.push_back(static_cast<char>(length));
    out.append(authorization, 0, length);
    out.append(wire);
    return out;
  }

  // A fresh message of the type `method` takes.
  static std::unique_ptr<google::protobuf::Message> NewMessage(Method method) {
    switch (method) {
      case Method::kGenerate:
      case Method::kGenerateStream:
        return std::make_unique<v1::GenerateRequest>();
      case Method::kTokenize:
        return std::make_unique<v1::TokenizeRequest>();
      case Method::kListModels:
        return std::make_unique<v1::ListModelsRequest>();
    }
    return nullptr;
  }
};

}  // namespace dmdserve::fuzz

#endif  // DMDSERVE_TESTS_FUZZ_REQUEST_INPUT_H_
