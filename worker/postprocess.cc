#include "worker/postprocess.h"

#include <ATen/ATen.h>

#if DMDSERVE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "worker/postprocess_kernel.h"
#endif

namespace dmdserve {

at::Tensor ToUint8NhwcTorch(const at::Tensor& images) {
  return ((images.to(at::kFloat) + 1) * 127.5)
      .clamp(0, 255)
      .round()
      .to(at::kByte)
      .permute({0, 2, 3, 1})
      .contiguous();
}

#if DMDSERVE_WITH_CUDA
at::Tensor ToUint8NhwcCuda(const at::Tensor& images) {
  TORCH_CHECK(images.is_cuda() && images.dim() == 4,
              "ToUint8NhwcCuda: expected a 4-d CUDA tensor, got ", images.sizes(), " on ",
              images.device());
  PixelType type = PixelType::kFloat32;
  switch (images.scalar_type()) {
    case at::kFloat:
      type = PixelType::kFloat32;
      break;
    case at::kHalf:
      type = PixelType::kFloat16;
      break;
    case at::kBFloat16:
      type = PixelType::kBFloat16;
      break;
    default:
      TORCH_CHECK(false, "ToUint8NhwcCuda: unsupported dtype ", images.scalar_type());
  }
  const at::Tensor input = images.contiguous();
  const int64_t n = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  at::Tensor pixels = at::empty({n, h, w, c}, input.options().dtype(at::kByte));
  C10_CUDA_CHECK(LaunchToUint8Nhwc(input.data_ptr(), type, pixels.data_ptr<uint8_t>(), n, c, h, w,
                                   c10::cuda::getCurrentCUDAStream(input.get_device()).stream()));
  return pixels;
}
#endif

}  // namespace dmdserve
