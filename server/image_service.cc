#include "server/image_service.h"

#include <chrono>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/counted_submit.h"
#include "server/grpc_happens_before.h"
#include "server/proto_conversion.h"
#include "server/status_util.h"
#include "server/wire_format.h"
#include "spdlog/spdlog.h"

namespace dmdserve {
namespace {

absl::Time DeadlineOf(const grpc::CallbackServerContext* context) {
  const auto deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

}  // namespace

void ImageGenerationService::Finished(RpcMethod method, std::string_view model,
                                      const std::string& request_id, const grpc::Status& status,
                                      absl::Time started, int images, std::string_view key) {
  const absl::Duration elapsed = absl::Now() - started;
  metrics_->RecordRequest(method, model, status.error_code(), elapsed, images);
  if (keys_ != nullptr) metrics_->RecordKeyRequest(key, status.error_code(), images);
  const std::string key_field = keys_ != nullptr ? absl::StrCat(" key=", std::string(key)) : "";
  if (status.ok()) {
    spdlog::info("rpc={} request_id={} model={}{} images={} code=OK seconds={:.4f}",
                 RpcMethodName(method), request_id, model, key_field, images,
                 absl::ToDoubleSeconds(elapsed));
  } else {
    spdlog::info("rpc={} request_id={} model={}{} images={} code={} seconds={:.4f} error=\"{}\"",
                 RpcMethodName(method), request_id, model, key_field, images,
                 GrpcCodeName(status.error_code()), absl::ToDoubleSeconds(elapsed),
                 status.error_message());
  }
}

absl::StatusOr<std::string> ImageGenerationService::Authorize(
    const grpc::CallbackServerContext* context) const {
  if (keys_ == nullptr) return std::string();
  const auto& metadata = context->client_metadata();
  const auto it = metadata.find("authorization");
  const absl::string_view value =
      it == metadata.end() ? absl::string_view() : absl::string_view(it->second.data(),
                                                                     it->second.size());
  return keys_->Authenticate(value);
}

absl::Status ImageGenerationService::Admit(const std::string& key, int images) const {
  return keys_ == nullptr ? absl::OkStatus() : keys_->Admit(key, images);
}

absl::StatusOr<GenerateParams> ImageGenerationService::Prepare(
    const v1::GenerateRequest& request, const grpc::CallbackServerContext* context) const {
  absl::StatusOr<GenerateParams> params = ToGenerateParams(request, limits_, DeadlineOf(context));
  if (!params.ok()) return params;
  absl::StatusOr<std::string> model = backend_->ResolveModel(params->model);
  if (!model.ok()) return model.status();
  params->model = *std::move(model);
  return params;
}

absl::Status ImageGenerationService::Submit(GenerateParams params, GenerateCallbacks callbacks,
                                            grpc::CallbackServerContext* context) {
  callbacks.is_cancelled = [context] { return context->IsCancelled(); };
  return SubmitCounted(*backend_, *metrics_, std::move(params), std::move(callbacks));
}

template <typename Request, typename Response, typename Handler>
grpc::ServerUnaryReactor* ImageGenerationService::Unary(RpcMethod method,
                                                        grpc::CallbackServerContext* context,
                                                        const grpc::ByteBuffer* request_bytes,
                                                        grpc::ByteBuffer* response_bytes,
                                                        Handler handler) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  struct Call {
    Request request;
    Response response;
  };
  auto call = std::make_shared<Call>();
  Finisher finish = [reactor, response_bytes, call](grpc::Status status) {
    if (status.ok()) {
      if (absl::Status s = SerializeResponse(call->response, response_bytes); !s.ok()) {
        status = ToGrpcStatus(s);
      }
    }
    reactor->Finish(status);
  };
  // Refused before the handler: bytes that do not parse, or no valid API key.
  const absl::Status parsed = ParseRequest(*request_bytes, &call->request);
  absl::StatusOr<std::string> key =
      parsed.ok() ? Authorize(context) : absl::StatusOr<std::string>(parsed);
  if (!key.ok()) {
    const grpc::Status status = ToGrpcStatus(key.status());
    Finished(method, "", "", status, absl::Now(), 0, kUnauthenticatedKey);
    finish(status);
    return reactor;
  }
  handler(call->request, *key, &call->response, std::move(finish));
  return reactor;
}

grpc::ServerUnaryReactor* ImageGenerationService::Generate(grpc::CallbackServerContext* context,
                                                           const grpc::ByteBuffer* request,
                                                           grpc::ByteBuffer* response) {
  return Unary<v1::GenerateRequest, v1::GenerateResponse>(
      RpcMethod::kGenerate, context, request, response,
      [this, context](const v1::GenerateRequest& parsed, const std::string& key,
                      v1::GenerateResponse* out, Finisher finish) {
        GenerateParsed(context, parsed, key, out, std::move(finish));
      });
}

void ImageGenerationService::GenerateParsed(grpc::CallbackServerContext* context,
                                            const v1::GenerateRequest& request,
                                            const std::string& key,
                                            v1::GenerateResponse* response, Finisher finish) {
  const absl::Time started = absl::Now();
  auto fail = [&](std::string_view model, const absl::Status& s) {
    grpc::Status status = ToGrpcStatus(s);
    Finished(RpcMethod::kGenerate, model, request.request_id(), status, started, 0, key);
    finish(status);
  };
  absl::StatusOr<GenerateParams> params = Prepare(request, context);
  if (!params.ok()) return fail(request.model(), params.status());
  const std::string model = params->model;
  if (absl::Status s = Admit(key, params->num_images); !s.ok()) return fail(model, s);

  GenerateCallbacks callbacks;
  callbacks.on_done = [this, finish, response, started, model, key,
                       request_id = params->request_id](absl::Status status,
                                                        GenerateResult result) {
    const int images = status.ok() ? static_cast<int>(result.images.size()) : 0;
    if (status.ok()) *response = ToGenerateResponse(request_id, std::move(result));
    grpc::Status grpc_status = ToGrpcStatus(status);
    Finished(RpcMethod::kGenerate, model, request_id, grpc_status, started, images, key);
    finish(grpc_status);
  };
  if (absl::Status s = Submit(*std::move(params), std::move(callbacks), context); !s.ok()) {
    fail(model, s);
  }
}

// Streams each image as soon as the backend hands it over. One write is outstanding at a time;
// images arriving meanwhile wait in `pending_`. Finish() follows the last write. StartWrite and
// Finish are called without `mu_` held, since gRPC may run reactions inline. Every state change
// goes through Pump(update), which applies it and decides under one lock: once the backend's
// on_done has released `mu_`, a gRPC thread may finish the RPC and delete the reactor, so the
// backend thread must not touch it again.
class ImageGenerationService::StreamReactor final
    : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  StreamReactor(ImageGenerationService* service, grpc::CallbackServerContext* context)
      : service_(service), context_(context), started_(absl::Now()) {}

  void Start(const grpc::ByteBuffer& request_bytes) {
    v1::GenerateRequest request;
    key_ = kUnauthenticatedKey;
    const absl::Status parsed = ParseRequest(request_bytes, &request);
    absl::StatusOr<std::string> key =
        parsed.ok() ? service_->Authorize(context_) : absl::StatusOr<std::string>(parsed);
    if (!key.ok()) return FailNow("", key.status());
    key_ = *std::move(key);
    request_id_ = request.request_id();
    absl::StatusOr<GenerateParams> params = service_->Prepare(request, context_);
    if (!params.ok()) return FailNow(request.model(), params.status());
    model_ = params->model;
    if (absl::Status s = service_->Admit(key_, params->num_images); !s.ok()) {
      return FailNow(model_, s);
    }

    GenerateCallbacks callbacks;
    callbacks.on_image = [this](GeneratedImage image, const GenerateResult& so_far) {
      grpc::ByteBuffer out;
      const absl::Status serialized = SerializeResponse(
          ToStreamedImage(request_id_, model_, std::move(image), so_far), &out);
      Pump([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        if (serialized.ok()) {
          pending_.push_back(std::move(out));
        } else {
          broken_ = true;  // cannot happen for our messages; fail the stream rather than skip
        }
      });
    };
    callbacks.on_done = [this](absl::Status status, GenerateResult) {
      Pump([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { final_status_ = ToGrpcStatus(status); });
    };
    if (absl::Status s = service_->Submit(*std::move(params), std::move(callbacks), context_);
        !s.ok()) {
      return FailNow(model_, s);
    }
  }

  void OnWriteDone(bool ok) override {
    AcquireFromGrpc(this);
    Pump([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      writing_ = false;
      pending_.pop_front();
      if (ok) ++images_;  // only images the client was sent count
      if (!ok) {
        // The client is gone; drop what is left and let the backend finish (it sees the
        // cancellation before running further images).
        pending_.clear();
        broken_ = true;
      }
    });
  }

  void OnDone() override {
    AcquireFromGrpc(this);
    delete this;
  }

 private:
  void FailNow(std::string_view model, const absl::Status& s) {
    grpc::Status status = ToGrpcStatus(s);
    service_->Finished(RpcMethod::kGenerateStream, model, request_id_, status, started_, 0, key_);
    ReleaseToGrpc(this);
    Finish(status);
  }

  // Applies `update` to the state, then starts the next write, or finishes once everything is
  // written and the backend is done; both under one hold of `mu_`. After it returns, the caller
  // must not touch the reactor (it may have been deleted).
  void Pump(absl::FunctionRef<void()> update) {
    const grpc::ByteBuffer* to_write = nullptr;
    std::optional<grpc::Status> to_finish;
    int images = 0;
    {
      absl::MutexLock lock(&mu_);
      update();
      if (writing_ || finish_called_) return;
      if (!pending_.empty() && !broken_) {
        writing_ = true;
        to_write = &pending_.front();  // deque::push_back keeps references valid
      } else if (final_status_.has_value()) {
        finish_called_ = true;
        to_finish = *final_status_;
        if (broken_ && to_finish->ok()) {
          // Generated, but the client stopped reading: it did not get every image.
          to_finish = grpc::Status(grpc::StatusCode::CANCELLED, "the client stopped reading");
        }
        images = images_;
      }
    }
    if (to_write != nullptr) {
      ReleaseToGrpc(this);
      StartWrite(to_write);
    } else if (to_finish.has_value()) {
      service_->Finished(RpcMethod::kGenerateStream, model_, request_id_, *to_finish, started_,
                         to_finish->ok() ? images : 0, key_);
      ReleaseToGrpc(this);
      Finish(*to_finish);
    }
  }

  ImageGenerationService* const service_;
  grpc::CallbackServerContext* const context_;
  const absl::Time started_;
  std::string request_id_;
  std::string model_;
  std::string key_;  // the API key's name

  absl::Mutex mu_;
  std::deque<grpc::ByteBuffer> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  int images_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<grpc::Status> final_status_ ABSL_GUARDED_BY(mu_);
};

grpc::ServerWriteReactor<grpc::ByteBuffer>* ImageGenerationService::GenerateStream(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  auto* reactor = new StreamReactor(this, context);
  reactor->Start(*request);
  return reactor;
}

grpc::ServerUnaryReactor* ImageGenerationService::ListModels(grpc::CallbackServerContext* context,
                                                             const grpc::ByteBuffer* request,
                                                             grpc::ByteBuffer* response) {
  return Unary<v1::ListModelsRequest, v1::ListModelsResponse>(
      RpcMethod::kListModels, context, request, response,
      [this](const v1::ListModelsRequest&, const std::string&, v1::ListModelsResponse* out,
             Finisher finish) {
        const absl::Time started = absl::Now();
        *out = ToListModelsResponse(backend_->ListModels());
        Finished(RpcMethod::kListModels, "", "", grpc::Status::OK, started, 0);
        finish(grpc::Status::OK);
      });
}

grpc::ServerUnaryReactor* ImageGenerationService::Tokenize(grpc::CallbackServerContext* context,
                                                           const grpc::ByteBuffer* request,
                                                           grpc::ByteBuffer* response) {
  return Unary<v1::TokenizeRequest, v1::TokenizeResponse>(
      RpcMethod::kTokenize, context, request, response,
      [this](const v1::TokenizeRequest& parsed, const std::string&, v1::TokenizeResponse* out,
             Finisher finish) {
        TokenizeParsed(parsed, out, std::move(finish));
      });
}

void ImageGenerationService::TokenizeParsed(const v1::TokenizeRequest& request,
                                            v1::TokenizeResponse* response, Finisher finish) {
  const absl::Time started = absl::Now();
  absl::StatusOr<TokenizeResult> result = [&]() -> absl::StatusOr<TokenizeResult> {
    if (absl::Status s = ValidateTokenizeRequest(request, limits_); !s.ok()) return s;
    return backend_->Tokenize(request.model(), request.text());
  }();
  std::string model = result.ok() ? result->model : request.model();
  if (result.ok()) *response = ToTokenizeResponse(*std::move(result));
  grpc::Status status = ToGrpcStatus(result.status());
  Finished(RpcMethod::kTokenize, model, "", status, started, 0);
  finish(status);
}

}  // namespace dmdserve
