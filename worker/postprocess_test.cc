#include "worker/postprocess.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gtest/gtest.h"

namespace dmdserve {
namespace {

// The documented formula, one float32 value at a time (std::nearbyint rounds half to even).
uint8_t Reference(float x) {
  const float value = std::min(std::max((x + 1.0f) * 127.5f, 0.0f), 255.0f);
  return static_cast<uint8_t>(std::nearbyint(value));
}

// [2, 3, 4, 5] values spanning and exceeding [-1, 1], with the exact ends and 0 among them.
at::Tensor Images(at::ScalarType dtype) {
  at::Tensor images =
      at::rand({2, 3, 4, 5}, at::make_generator<at::CPUGeneratorImpl>(11), at::kFloat) * 2.6 - 1.3;
  images[0][0][0][0] = -1.0;
  images[0][0][0][1] = 1.0;
  images[0][0][0][2] = 0.0;
  return images.to(dtype);
}

void ExpectFormulaAndNhwcLayout(const at::Tensor& images) {
  const at::Tensor pixels = ToUint8NhwcTorch(images);
  ASSERT_EQ(pixels.scalar_type(), at::kByte);
  ASSERT_EQ(pixels.sizes(), (at::IntArrayRef{2, 4, 5, 3}));
  ASSERT_TRUE(pixels.is_contiguous());
  const at::Tensor values = images.to(at::kFloat);  // the values the formula sees
  const auto in = values.accessor<float, 4>();
  const auto out = pixels.accessor<uint8_t, 4>();
  int saturated = 0;
  for (int n = 0; n < 2; ++n) {
    for (int c = 0; c < 3; ++c) {
      for (int y = 0; y < 4; ++y) {
        for (int x = 0; x < 5; ++x) {
          EXPECT_EQ(out[n][y][x][c], Reference(in[n][c][y][x]))
              << "n " << n << " c " << c << " y " << y << " x " << x << " value " << in[n][c][y][x];
          saturated += out[n][y][x][c] == 0 || out[n][y][x][c] == 255;
        }
      }
    }
  }
  EXPECT_GT(saturated, 0) << "the inputs should exercise the clamp";
}

TEST(PostprocessTest, TorchOpsFollowTheFormulaInNhwcLayout) {
  ExpectFormulaAndNhwcLayout(Images(at::kFloat));
}

TEST(PostprocessTest, BFloat16ImagesAreConvertedToFloat32First) {
  ExpectFormulaAndNhwcLayout(Images(at::kBFloat16));
}

}  // namespace
}  // namespace dmdserve
