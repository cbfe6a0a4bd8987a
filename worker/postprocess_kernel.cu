#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "worker/postprocess_kernel.h"

namespace dmdserve {
namespace {

__device__ float ToFloat(float v) { return v; }
__device__ float ToFloat(__half v) { return __half2float(v); }
__device__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

// One thread per output byte, grid-stride: consecutive threads write consecutive bytes.
template <typename T>
__global__ void ToUint8NhwcKernel(const T* __restrict__ images, uint8_t* __restrict__ pixels,
                                  int64_t channels, int64_t plane, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t out = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; out < total;
       out += stride) {
    const int64_t c = out % channels;
    const int64_t pixel = out / channels;  // n * plane + y * width + x
    const int64_t in = (pixel / plane * channels + c) * plane + pixel % plane;
    const float value = (ToFloat(images[in]) + 1.0f) * 127.5f;
    // rintf rounds half to even, like torch.round; fmaxf maps NaN to 0.
    pixels[out] = static_cast<uint8_t>(rintf(fminf(fmaxf(value, 0.0f), 255.0f)));
  }
}

template <typename T>
cudaError_t Launch(const void* images, uint8_t* pixels, int64_t n, int64_t channels, int64_t height,
                   int64_t width, cudaStream_t stream) {
  const int64_t plane = height * width;
  const int64_t total = n * channels * plane;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
  ToUint8NhwcKernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(images), pixels, channels, plane, total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchToUint8Nhwc(const void* images, PixelType type, uint8_t* pixels, int64_t n,
                              int64_t channels, int64_t height, int64_t width,
                              cudaStream_t stream) {
  switch (type) {
    case PixelType::kFloat32:
      return Launch<float>(images, pixels, n, channels, height, width, stream);
    case PixelType::kFloat16:
      return Launch<__half>(images, pixels, n, channels, height, width, stream);
    case PixelType::kBFloat16:
      return Launch<__nv_bfloat16>(images, pixels, n, channels, height, width, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dmdserve
