// FakeEngine: the GenerationBackend behind request_fuzzer, standing in for the Engine.
//
// It serves two fake models and answers every accepted request at once, on the calling thread
// (the contract allows callbacks before Submit() returns), with small fake images. What it checks
// is the contract the service must keep with the engine: every request that reaches Submit() is
// one that request validation should have let through (a resolved model name, a non-empty prompt
// within the byte limit, 1..limit images, both sizes set or neither, a short printable request
// id, a deadline); a violation aborts the fuzzer. It then applies the engine's own model-dependent
// checks (the model's image limit and sizes) and tokenizes the prompt with the real CLIP
// tokenizer, which must accept it: protobuf strings are UTF-8.
//
// Thread-safe; Submit() and Tokenize() may run on any gRPC thread.
#ifndef DMDSERVE_TESTS_FUZZ_FAKE_ENGINE_H_
#define DMDSERVE_TESTS_FUZZ_FAKE_ENGINE_H_

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/generation_backend.h"
#include "server/request_validation.h"
#include "tests/fuzz/fuzz_check.h"
#include "worker/clip_tokenizer.h"

namespace dmdserve::fuzz {

class FakeEngine final : public GenerationBackend {
 public:
  // `tokenizer` (not owned) must outlive the engine; `limits` are the service's.
  FakeEngine(const ClipTokenizer* tokenizer, RequestLimits limits)
      : tokenizer_(tokenizer), limits_(limits) {
    models_.push_back(MakeModel("fake-dmd", /*max_images=*/8, {{64, 64}, {32, 48}}, true));
    models_.push_back(MakeModel("fake-teacher", /*max_images=*/2, {{28, 28}}, false));
  }

  absl::StatusOr<std::string> ResolveModel(std::string_view name) const override {
    if (name.empty()) return models_[0].name;
    for (const ModelInfo& m : models_) {
      if (m.name == name) return m.name;
    }
    return absl::NotFoundError(absl::StrCat("model '", std::string(name),
                                            "' is not served; served: fake-dmd, fake-teacher"));
  }

  absl::Status Submit(GenerateParams params, GenerateCallbacks callbacks) override {
    CheckServiceContract(params, callbacks);
    const ModelInfo& model = Find(params.model);
    if (params.num_images > model.max_images_per_request) {
      return absl::InvalidArgumentError(absl::StrCat("num_images is ", params.num_images,
                                                     "; the limit of model '", model.name, "' is ",
                                                     model.max_images_per_request));
    }
    if (!Supports(model, params.width, params.height)) {
      return absl::InvalidArgumentError(
          absl::StrCat("width x height ", params.width, "x", params.height, " is not supported"));
    }
    absl::StatusOr<ClipTokenizer::ModelInput> input = tokenizer_->EncodeForModel(params.prompt);
    FUZZ_CHECK(input.ok());  // the service passed a prompt that is not UTF-8
    ++accepted_;
    Serve(params, model, input->truncated_tokens, callbacks);
    return absl::OkStatus();
  }

  absl::StatusOr<TokenizeResult> Tokenize(std::string_view model,
                                          std::string_view text) const override {
    absl::StatusOr<std::string> name = ResolveModel(model);
    if (!name.ok()) return name.status();
    absl::StatusOr<ClipTokenizer::ModelInput> input = tokenizer_->EncodeForModel(text);
    if (!input.ok()) return input.status();
    TokenizeResult result;
    result.model = *name;
    result.ids = input->ids;
    for (int32_t id : result.ids) result.tokens.push_back(tokenizer_->TokenString(id));
    result.input_ids = input->input_ids;
    result.truncated_tokens = input->truncated_tokens;
    return result;
  }

  std::vector<ModelInfo> ListModels() const override { return models_; }

  // Requests accepted by Submit() and requests finished (on_done called): equal whenever no
  // call is in flight, since every accepted request is answered before Submit() returns.
  int accepted() const { return accepted_.load(); }
  int finished() const { return finished_.load(); }

  // The bytes of fake image `index` of a request for `prompt`.
  static std::string ImageBytes(std::string_view prompt, int index) {
    return absl::StrCat("image ", index, " of ", prompt.size(), " prompt bytes");
  }

 private:
  static ModelInfo MakeModel(std::string name, int max_images, std::vector<ImageSize> sizes,
                             bool is_default) {
    ModelInfo m;
    m.name = std::move(name);
    m.width = sizes[0].width;
    m.height = sizes[0].height;
    m.channels = 3;
    m.steps = 1;
    m.is_default = is_default;
    m.max_images_per_request = max_images;
    m.ready = true;
    m.supported_sizes = std::move(sizes);
    m.max_tokens = 77;
    return m;
  }

  const ModelInfo& Find(const std::string& name) const {
    for (const ModelInfo& m : models_) {
      if (m.name == name) return m;
    }
    FUZZ_CHECK(false && "Submit() got a model name ResolveModel() did not return");
    std::abort();
  }

  static bool Supports(const ModelInfo& model, int width, int height) {
    if (width == 0 && height == 0) return true;
    for (const ImageSize& size : model.supported_sizes) {
      if (size.width == width && size.height == height) return true;
    }
    return false;
  }

  // What request validation guarantees to the engine (server/request_validation.h).
  void CheckServiceContract(const GenerateParams& p, const GenerateCallbacks& callbacks) const {
    FUZZ_CHECK(callbacks.on_done != nullptr);
    FUZZ_CHECK(!p.prompt.empty());
    FUZZ_CHECK(static_cast<int>(p.prompt.size()) <= limits_.max_prompt_bytes);
    FUZZ_CHECK(p.num_images >= 1 && p.num_images <= limits_.max_images_per_request);
    FUZZ_CHECK(p.width >= 0 && p.height >= 0 && (p.width == 0) == (p.height == 0));
    FUZZ_CHECK(static_cast<int>(p.request_id.size()) <= limits_.max_request_id_bytes);
    for (char c : p.request_id) FUZZ_CHECK(absl::ascii_isprint(static_cast<unsigned char>(c)));
    FUZZ_CHECK(p.deadline != absl::InfiniteFuture());  // the fuzzer's client always sets one
  }

  void Serve(const GenerateParams& params, const ModelInfo& model, int truncated_tokens,
             GenerateCallbacks& callbacks) {
    GenerateResult result;
    result.model = model.name;
    result.truncated_tokens = truncated_tokens;
    for (int i = 0; i < params.num_images; ++i) {
      if (callbacks.is_cancelled && callbacks.is_cancelled()) {
        ++finished_;
        callbacks.on_done(absl::CancelledError("the client cancelled"), GenerateResult());
        return;
      }
      GeneratedImage image;
      image.index = i;
      image.seed = params.seed.value_or(1000) + i;
      image.width = params.width == 0 ? model.width : params.width;
      image.height = params.height == 0 ? model.height : params.height;
      image.channels = 3;
      image.encoding = params.encoding;
      image.data = ImageBytes(params.prompt, i);
      if (callbacks.on_image) {
        callbacks.on_image(std::move(image), result);
      } else {
        result.images.push_back(std::move(image));
      }
    }
    ++finished_;
    callbacks.on_done(absl::OkStatus(), std::move(result));
  }

  const ClipTokenizer* const tokenizer_;
  const RequestLimits limits_;
  std::vector<ModelInfo> models_;
  std::atomic<int> accepted_{0};
  std::atomic<int> finished_{0};
};

}  // namespace dmdserve::fuzz

#endif  // DMDSERVE_TESTS_FUZZ_FAKE_ENGINE_H_
