// The CUDA kernel behind ToUint8NhwcCuda (worker/postprocess.h), behind a plain CUDA-runtime
// interface so that nvcc never compiles libtorch headers. CUDA builds only.
#ifndef DMDSERVE_WORKER_POSTPROCESS_KERNEL_H_
#define DMDSERVE_WORKER_POSTPROCESS_KERNEL_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dmdserve {

// Element type of the decoded images.
enum class PixelType { kFloat32, kFloat16, kBFloat16 };

// Queues on `stream`: pixels[n][y][x][c] = round_half_to_even(clamp((images[n][c][y][x] + 1) *
// 127.5, 0, 255)), with `images` a contiguous [n, channels, height, width] array of `type` and
// `pixels` a contiguous uint8 array of the same element count, both in device memory. Returns the
// launch's error (cudaSuccess once queued). NaN becomes 0.
cudaError_t LaunchToUint8Nhwc(const void* images, PixelType type, uint8_t* pixels, int64_t n,
                              int64_t channels, int64_t height, int64_t width, cudaStream_t stream);

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_POSTPROCESS_KERNEL_H_
