// DmdClient: a blocking client of one dmdserve server: the dmdserve.v1.ImageGeneration API and
// the standard grpc.health.v1.Health service.
//
// Owns its channel. Thread-safe: every method may be called from many threads at once (gRPC
// stubs and channels are), each call carrying its own deadline of Options::timeout. Calls fail
// fast with UNAVAILABLE when the server cannot be reached. gRPC statuses are returned as
// absl::Status with the same code and message.
//
//   absl::StatusOr<std::unique_ptr<DmdClient>> client = DmdClient::Create({"localhost:50051"});
//   absl::StatusOr<v1::ListModelsResponse> models = (*client)->ListModels();
#ifndef DMDSERVE_CLIENT_DMD_CLIENT_H_
#define DMDSERVE_CLIENT_DMD_CLIENT_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dmdserve/v1/dmdserve.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/channel.h"

namespace dmdserve::client {

class DmdClient {
 public:
  struct Options {
    // gRPC target of the server, e.g. "localhost:50051" or "dns:///dmdserve:50051". Required.
    std::string target;
    // Deadline of each call, counted from its start. Must be > 0. Default 60 s.
    absl::Duration timeout = absl::Seconds(60);
    // Largest response message accepted, in bytes. 0 (default): unlimited. (gRPC's own default,
    // 4 MiB, is smaller than a response with a few raw 512x512 images.)
    int max_response_bytes = 0;
    // TLS: a PEM CA bundle to verify the server with. Empty (default): plaintext, unless a
    // client certificate is set (then the system's roots verify the server).
    std::string tls_ca_file;
    // mTLS: the client's PEM certificate chain and private key, both or neither.
    std::string tls_cert_file;
    std::string tls_key_file;

    // API key sent with every call as "authorization: Bearer KEY". Empty (default): none.
    std::string api_key;

    bool tls() const { return !tls_ca_file.empty() || !tls_cert_file.empty(); }
  };

  static absl::StatusOr<std::unique_ptr<DmdClient>> Create(const Options& options);

  absl::StatusOr<v1::GenerateResponse> Generate(const v1::GenerateRequest& request) const;

  // Calls `on_image` on the calling thread for each image as it arrives; returns the status the
  // stream ended with. A non-OK status from `on_image` cancels the call and is returned.
  absl::Status GenerateStream(
      const v1::GenerateRequest& request,
      const std::function<absl::Status(const v1::GeneratedImage&)>& on_image) const;

  absl::StatusOr<v1::ListModelsResponse> ListModels() const;

  absl::StatusOr<v1::TokenizeResponse> Tokenize(const v1::TokenizeRequest& request) const;

  // grpc.health.v1.Health/Check of `service` ("" = the whole server).
  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> CheckHealth(
      const std::string& service) const;

 private:
  DmdClient(const Options& options, const std::shared_ptr<grpc::Channel>& channel);
  // Sets the deadline of a new call.
  void Prepare(grpc::ClientContext* context) const;

  const Options options_;
  std::unique_ptr<v1::ImageGeneration::Stub> generation_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// The absl::Status with the code and message of `status` (the codes are numerically equal).
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace dmdserve::client

#endif  // DMDSERVE_CLIENT_DMD_CLIENT_H_
