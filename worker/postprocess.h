// Post-processing of decoded images on their own device, so that a single small uint8 copy leaves
// it: [-1, 1] floats in NCHW become uint8 pixels in NHWC,
//   pixel = round_half_to_even(clamp((x + 1) * 127.5, 0, 255))   with x converted to float32.
// Two implementations make the same bytes, so that both can be timed on a GPU (docs/GPU.md):
// libtorch ops (any device) and one dmdserve CUDA kernel (worker/postprocess_kernel.cu, CUDA
// builds only).
//
// Thread safety: reentrant. Both throw c10::Error on libtorch errors; Pipeline catches them.
#ifndef DMDSERVE_WORKER_POSTPROCESS_H_
#define DMDSERVE_WORKER_POSTPROCESS_H_

#include <ATen/core/Tensor.h>

namespace dmdserve {

// images: [N, C, H, W] float32, float16 or bfloat16 on any device. Returns [N, H, W, C] uint8,
// contiguous, on the same device.
at::Tensor ToUint8NhwcTorch(const at::Tensor& images);

#if DMDSERVE_WITH_CUDA
// The same with one kernel launch on the current CUDA stream; `images` must be on a CUDA device.
at::Tensor ToUint8NhwcCuda(const at::Tensor& images);
#endif

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_POSTPROCESS_H_
