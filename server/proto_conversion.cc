#include "server/proto_conversion.h"

#include <utility>

#include "absl/time/time.h"

namespace dmdserve {
namespace {

v1::ImageEncoding ToProto(ImageEncoding e) {
  return e == ImageEncoding::kRaw ? v1::IMAGE_ENCODING_RAW : v1::IMAGE_ENCODING_PNG;
}

void ToProto(const RequestTimings& t, v1::Timings* out) {
  out->set_queue_seconds(absl::ToDoubleSeconds(t.queue));
  out->set_text_encoder_seconds(absl::ToDoubleSeconds(t.text_encoder));
  out->set_generator_seconds(absl::ToDoubleSeconds(t.generator));
  out->set_decoder_seconds(absl::ToDoubleSeconds(t.decoder));
  out->set_encode_seconds(absl::ToDoubleSeconds(t.encode));
  out->set_total_seconds(absl::ToDoubleSeconds(t.total));
  out->set_batch_size(t.batch_size);
}

void ToProto(GeneratedImage&& image, v1::GeneratedImage* out) {
  out->set_index(image.index);
  out->set_seed(image.seed);
  out->set_width(image.width);
  out->set_height(image.height);
  out->set_channels(image.channels);
  out->set_encoding(ToProto(image.encoding));
  out->set_data(std::move(image.data));
}

void ToProto(const ModelInfo& info, v1::ModelInfo* out) {
  out->set_name(info.name);
  out->set_description(info.description);
  out->set_width(info.width);
  out->set_height(info.height);
  out->set_channels(info.channels);
  out->set_steps(info.steps);
  out->set_is_default(info.is_default);
  out->set_max_images_per_request(info.max_images_per_request);
  out->set_ready(info.ready);
  out->set_max_tokens(info.max_tokens);
  for (const ImageSize& size : info.supported_sizes) {
    v1::ImageSize* s = out->add_supported_sizes();
    s->set_width(size.width);
    s->set_height(size.height);
  }
  for (const DeviceBatching& batching : info.batching) {
    v1::DeviceBatching* b = out->add_batching();
    b->set_device(batching.device);
    b->set_max_batch_size(batching.max_batch_size);
    for (const BatchCost& cost : batching.measured) {
      v1::BatchThroughput* t = b->add_measured();
      t->set_batch_size(cost.batch_size);
      t->set_images_per_second(cost.images_per_second);
    }
  }
}

}  // namespace

v1::GenerateResponse ToGenerateResponse(const std::string& request_id, GenerateResult&& result) {
  v1::GenerateResponse out;
  out.set_request_id(request_id);
  out.set_model(result.model);
  out.set_truncated_tokens(result.truncated_tokens);
  ToProto(result.timings, out.mutable_timings());
  for (GeneratedImage& image : result.images) ToProto(std::move(image), out.add_images());
  return out;
}

v1::GeneratedImage ToStreamedImage(const std::string& request_id, const std::string& model,
                                   GeneratedImage&& image, const GenerateResult& so_far) {
  v1::GeneratedImage out;
  ToProto(std::move(image), &out);
  ToProto(so_far.timings, out.mutable_timings());
  out.set_request_id(request_id);
  out.set_model(model);
  out.set_truncated_tokens(so_far.truncated_tokens);
  return out;
}

v1::ListModelsResponse ToListModelsResponse(const std::vector<ModelInfo>& models) {
  v1::ListModelsResponse out;
  for (const ModelInfo& info : models) ToProto(info, out.add_models());
  return out;
}

v1::TokenizeResponse ToTokenizeResponse(TokenizeResult&& result) {
  v1::TokenizeResponse out;
  out.set_model(result.model);
  out.mutable_ids()->Assign(result.ids.begin(), result.ids.end());
  for (std::string& token : result.tokens) out.add_tokens(std::move(token));
  out.mutable_input_ids()->Assign(result.input_ids.begin(), result.input_ids.end());
  out.set_truncated_tokens(result.truncated_tokens);
  return out;
}

}  // namespace dmdserve
