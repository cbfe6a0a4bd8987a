// GenerationBackend: the part of the engine that the gRPC service (server/image_service.h) calls,
// as an interface, so that the service can be tested against a fake and reads as what it is: an
// adapter between the wire and these four calls. EngineBackend implements it with the real Engine.
//
// The request and result types are worker/'s (worker/engine.h); the contract of each method is
// the Engine's of the same name, restated here where the service relies on it.
#ifndef DMDSERVE_SERVER_GENERATION_BACKEND_H_
#define DMDSERVE_SERVER_GENERATION_BACKEND_H_

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/engine.h"

namespace dmdserve {

// Thread safety: every method may be called concurrently from any gRPC thread and must not block
// on request work (only on short internal locks). Callbacks of an accepted request may arrive on
// any thread, including before Submit() returns; the service makes no assumption about which.
class GenerationBackend {
 public:
  virtual ~GenerationBackend() = default;

  // The name of the served model `name` refers to (empty: the default model); NOT_FOUND naming
  // the served models otherwise.
  virtual absl::StatusOr<std::string> ResolveModel(std::string_view name) const = 0;

  // Accepts a request (params.model already resolved) or fails fast with a status, in which case
  // no callback is ever called. Once it returns OK, callbacks.on_done is called exactly once;
  // callbacks.on_image (when set) is called once per image, in any index order, serialised and
  // before on_done; callbacks.is_cancelled (when set) is polled with the same serialisation and
  // never after on_done. Callbacks must not block. See GenerateCallbacks in worker/engine.h.
  virtual absl::Status Submit(GenerateParams params, GenerateCallbacks callbacks) = 0;

  // Tokenizes `text` with `model`'s tokenizer (empty: the default model) as Submit would.
  virtual absl::StatusOr<TokenizeResult> Tokenize(std::string_view model,
                                                  std::string_view text) const = 0;

  // Every served model, the default one flagged.
  virtual std::vector<ModelInfo> ListModels() const = 0;
};

// The real backend: forwards to an Engine, which is not owned and must outlive it. Thread-safe
// (the Engine is).
class EngineBackend final : public GenerationBackend {
 public:
  explicit EngineBackend(Engine* engine) : engine_(engine) {}

  absl::StatusOr<std::string> ResolveModel(std::string_view name) const override {
    return engine_->ResolveModel(name);
  }
  absl::Status Submit(GenerateParams params, GenerateCallbacks callbacks) override {
    return engine_->Submit(std::move(params), std::move(callbacks));
  }
  absl::StatusOr<TokenizeResult> Tokenize(std::string_view model,
                                          std::string_view text) const override {
    return engine_->Tokenize(model, text);
  }
  std::vector<ModelInfo> ListModels() const override { return engine_->ListModels(); }

 private:
  Engine* const engine_;
};

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_GENERATION_BACKEND_H_
