#include "client/dmd_client.h"

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace dmdserve::client {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

namespace {

// The whole file; INVALID_ARGUMENT naming `flag` when it cannot be read or is empty.
absl::StatusOr<std::string> ReadPem(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  if (!in || bytes.str().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(flag, "=", path, ": cannot read the file"));
  }
  return bytes.str();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> Credentials(
    const DmdClient::Options& options) {
  if (!options.tls()) return grpc::InsecureChannelCredentials();
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls_cert_file and --tls_key_file go together: set both");
  }
  grpc::SslCredentialsOptions ssl;
  const std::pair<const char*, std::pair<const std::string*, std::string*>> files[] = {
      {"--tls_ca_file", {&options.tls_ca_file, &ssl.pem_root_certs}},
      {"--tls_cert_file", {&options.tls_cert_file, &ssl.pem_cert_chain}},
      {"--tls_key_file", {&options.tls_key_file, &ssl.pem_private_key}}};
  for (const auto& [flag, paths] : files) {
    if (paths.first->empty()) continue;
    absl::StatusOr<std::string> pem = ReadPem(flag, *paths.first);
    if (!pem.ok()) return pem.status();
    *paths.second = *std::move(pem);
  }
  return grpc::SslCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<DmdClient>> DmdClient::Create(const Options& options) {
  if (options.target.empty()) return absl::InvalidArgumentError("DmdClient: target is empty");
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("DmdClient: timeout must be > 0, got ",
                                                   absl::FormatDuration(options.timeout)));
  }
  if (options.max_response_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DmdClient: max_response_bytes must be >= 0, got ", options.max_response_bytes));
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials = Credentials(options);
  if (!credentials.ok()) return credentials.status();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_response_bytes == 0 ? -1 : options.max_response_bytes);
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(options.target, *credentials, args);
  return std::unique_ptr<DmdClient>(new DmdClient(options, channel));
}

DmdClient::DmdClient(const Options& options, const std::shared_ptr<grpc::Channel>& channel)
    : options_(options),
      generation_(v1::ImageGeneration::NewStub(channel)),
      health_(grpc::health::v1::Health::NewStub(channel)) {}

void DmdClient::Prepare(grpc::ClientContext* context) const {
  context->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  if (!options_.api_key.empty()) {
    context->AddMetadata("authorization", absl::StrCat("Bearer ", options_.api_key));
  }
}

absl::StatusOr<v1::GenerateResponse> DmdClient::Generate(const v1::GenerateRequest& request) const {
  grpc::ClientContext context;
  Prepare(&context);
  v1::GenerateResponse response;
  grpc::Status status = generation_->Generate(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::Status DmdClient::GenerateStream(
    const v1::GenerateRequest& request,
    const std::function<absl::Status(const v1::GeneratedImage&)>& on_image) const {
  grpc::ClientContext context;
  Prepare(&context);
  std::unique_ptr<grpc::ClientReader<v1::GeneratedImage>> reader =
      generation_->GenerateStream(&context, request);
  v1::GeneratedImage image;
  absl::Status callback_status;
  while (callback_status.ok() && reader->Read(&image)) callback_status = on_image(image);
  if (!callback_status.ok()) context.TryCancel();
  grpc::Status status = reader->Finish();
  if (!callback_status.ok()) return callback_status;
  return FromGrpcStatus(status);
}

absl::StatusOr<v1::ListModelsResponse> DmdClient::ListModels() const {
  grpc::ClientContext context;
  Prepare(&context);
  v1::ListModelsResponse response;
  grpc::Status status = generation_->ListModels(&context, v1::ListModelsRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::TokenizeResponse> DmdClient::Tokenize(const v1::TokenizeRequest& request) const {
  grpc::ClientContext context;
  Prepare(&context);
  v1::TokenizeResponse response;
  grpc::Status status = generation_->Tokenize(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> DmdClient::CheckHealth(
    const std::string& service) const {
  grpc::ClientContext context;
  Prepare(&context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = health_->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response.status();
}

}  // namespace dmdserve::client
