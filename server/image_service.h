// ImageGenerationService: the gRPC callback-API implementation of dmdserve.v1.ImageGeneration.
//
// A thin adapter: each handler parses the request bytes (wire_format.h: an unparseable request
// gets INVALID_ARGUMENT, is counted and logged, instead of gRPC's bare UNIMPLEMENTED), validates
// the request and converts it to native types
// (request_validation.h), hands it to the backend (generation_backend.h: the Engine, in dmdserve)
// and returns at once -- no handler blocks. The backend's completion callbacks finish the reactors
// on its threads. Statuses are mapped to gRPC once (status_util.h); each finished RPC is counted
// in Metrics and logged as one line.
// Thread-safe; does not own the backend or metrics, which must outlive it (and every RPC it
// accepted: stop the grpc::Server first).
#ifndef DMDSERVE_SERVER_IMAGE_SERVICE_H_
#define DMDSERVE_SERVER_IMAGE_SERVICE_H_

#include <functional>

#include "dmdserve/v1/dmdserve.grpc.pb.h"
#include "server/api_keys.h"
#include "server/generation_backend.h"
#include "server/metrics.h"
#include "server/request_validation.h"

namespace dmdserve {

// Every method takes and returns bytes (the generated "raw" callback methods), parsed here.
using RawImageGenerationService = v1::ImageGeneration::WithRawCallbackMethod_Generate<
    v1::ImageGeneration::WithRawCallbackMethod_GenerateStream<
        v1::ImageGeneration::WithRawCallbackMethod_ListModels<
            v1::ImageGeneration::WithRawCallbackMethod_Tokenize<
                v1::ImageGeneration::CallbackService>>>>;

class ImageGenerationService final : public RawImageGenerationService {
 public:
  // `keys` (not owned; nullptr: no authentication) must outlive the service.
  ImageGenerationService(GenerationBackend* backend, Metrics* metrics, RequestLimits limits,
                         ApiKeys* keys = nullptr)
      : backend_(backend), metrics_(metrics), limits_(limits), keys_(keys) {}

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* GenerateStream(
      grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;

 private:
  class StreamReactor;
  // Ends a unary RPC: serializes the typed response into the reply bytes when the status is OK.
  using Finisher = std::function<void(grpc::Status)>;

  // The typed handlers behind the raw methods; each calls `finish` exactly once.
  void GenerateParsed(grpc::CallbackServerContext* context, const v1::GenerateRequest& request,
                      const std::string& key, v1::GenerateResponse* response, Finisher finish);
  void TokenizeParsed(const v1::TokenizeRequest& request, v1::TokenizeResponse* response,
                      Finisher finish);

  // Parses a unary request into a Request kept (with its Response) until the RPC finishes,
  // authenticates it, and runs `handler(request, key name, response, finish)`; an unparseable
  // one finishes with INVALID_ARGUMENT, an unauthenticated one with UNAUTHENTICATED, both counted
  // and logged as `method`.
  template <typename Request, typename Response, typename Handler>
  grpc::ServerUnaryReactor* Unary(RpcMethod method, grpc::CallbackServerContext* context,
                                  const grpc::ByteBuffer* request_bytes,
                                  grpc::ByteBuffer* response_bytes, Handler handler);

  // Validates a Generate/GenerateStream request and resolves its model (params.model is then the
  // served model's name).
  absl::StatusOr<GenerateParams> Prepare(const v1::GenerateRequest& request,
                                         const grpc::CallbackServerContext* context) const;

  // GenerationBackend::Submit plus the per-request metrics both Generate RPCs share: the in-flight
  // gauge (counted from acceptance to on_done) and, on success, the queue wait. Also polls the
  // RPC's cancellation before the images enter a batch.
  absl::Status Submit(GenerateParams params, GenerateCallbacks callbacks,
                      grpc::CallbackServerContext* context);

  // The API key the call carries ("" without --api_keys_file); UNAUTHENTICATED otherwise.
  absl::StatusOr<std::string> Authorize(const grpc::CallbackServerContext* context) const;
  // A Generate's admission by its key's rate limit (OK without keys or limit).
  absl::Status Admit(const std::string& key, int images) const;

  // Records the metrics and the log line of a finished RPC (`key`: its API key's name, if any).
  void Finished(RpcMethod method, std::string_view model, const std::string& request_id,
                const grpc::Status& status, absl::Time started, int images,
                std::string_view key = "");

  GenerationBackend* const backend_;
  Metrics* const metrics_;
  const RequestLimits limits_;
  ApiKeys* const keys_;
};

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_IMAGE_SERVICE_H_
