#include "server/proto_conversion.h"

#include <gtest/gtest.h>

namespace dmdserve {
namespace {

TEST(ProtoConversionTest, GenerateResponseHasEveryImageAndTheRequestFields) {
  GenerateResult result;
  result.model = "tiny";
  result.truncated_tokens = 3;
  result.timings.queue = absl::Milliseconds(250);
  result.timings.total = absl::Seconds(2);
  result.timings.batch_size = 4;
  result.images.push_back({0, 7, 64, 32, 3, ImageEncoding::kPng, "png-a", {}});
  result.images.push_back({1, 8, 64, 32, 1, ImageEncoding::kRaw, "raw-b", {}});
  const v1::GenerateResponse r = ToGenerateResponse("req-1", std::move(result));
  EXPECT_EQ(r.request_id(), "req-1");
  EXPECT_EQ(r.model(), "tiny");
  EXPECT_EQ(r.truncated_tokens(), 3);
  EXPECT_DOUBLE_EQ(r.timings().queue_seconds(), 0.25);
  EXPECT_DOUBLE_EQ(r.timings().total_seconds(), 2.0);
  EXPECT_EQ(r.timings().batch_size(), 4);
  ASSERT_EQ(r.images_size(), 2);
  EXPECT_EQ(r.images(0).seed(), 7u);
  EXPECT_EQ(r.images(0).encoding(), v1::IMAGE_ENCODING_PNG);
  EXPECT_EQ(r.images(0).data(), "png-a");
  EXPECT_EQ(r.images(1).index(), 1);
  EXPECT_EQ(r.images(1).channels(), 1);
  EXPECT_EQ(r.images(1).encoding(), v1::IMAGE_ENCODING_RAW);
  EXPECT_EQ(r.images(1).width(), 64);
  EXPECT_EQ(r.images(1).height(), 32);
}

TEST(ProtoConversionTest, StreamedImageCarriesTheRequestLevelFields) {
  GenerateResult so_far;
  so_far.truncated_tokens = 1;
  so_far.timings.encode = absl::Milliseconds(5);
  const v1::GeneratedImage image = ToStreamedImage(
      "r", "tiny", {2, 9, 8, 8, 3, ImageEncoding::kPng, "x", absl::Milliseconds(5)}, so_far);
  EXPECT_EQ(image.index(), 2);
  EXPECT_EQ(image.seed(), 9u);
  EXPECT_EQ(image.request_id(), "r");
  EXPECT_EQ(image.model(), "tiny");
  EXPECT_EQ(image.truncated_tokens(), 1);
  EXPECT_DOUBLE_EQ(image.timings().encode_seconds(), 0.005);
}

TEST(ProtoConversionTest, ModelsAndTokens) {
  ModelInfo info;
  info.name = "tiny";
  info.is_default = true;
  info.supported_sizes = {{64, 64}, {64, 32}};
  info.batching.push_back({"cpu", 8, {{1, 10.0}, {8, 40.0}}});
  const v1::ListModelsResponse models = ToListModelsResponse({info});
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_TRUE(models.models(0).is_default());
  ASSERT_EQ(models.models(0).supported_sizes_size(), 2);
  EXPECT_EQ(models.models(0).supported_sizes(1).height(), 32);
  ASSERT_EQ(models.models(0).batching_size(), 1);
  EXPECT_EQ(models.models(0).batching(0).max_batch_size(), 8);
  EXPECT_DOUBLE_EQ(models.models(0).batching(0).measured(1).images_per_second(), 40.0);

  TokenizeResult tokens{"tiny", {320, 1929}, {"a</w>", "cat</w>"}, {49406, 320, 1929, 49407}, 0};
  const v1::TokenizeResponse t = ToTokenizeResponse(std::move(tokens));
  EXPECT_EQ(t.model(), "tiny");
  ASSERT_EQ(t.ids_size(), 2);
  EXPECT_EQ(t.tokens(1), "cat</w>");
  EXPECT_EQ(t.input_ids_size(), 4);
}

}  // namespace
}  // namespace dmdserve
