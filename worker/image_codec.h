// PNG encoding of 8-bit grey or RGB images in memory, with libpng: the encode stage of serving.
// (Tests decode with DecodePng, worker/testing/png_decode.h.)
//
// Reentrant (no shared state; each call owns its libpng structures); never throws or aborts:
// libpng errors are caught with setjmp/longjmp inside the call and returned as statuses. Example:
//
//   absl::StatusOr<std::string> png =
//       EncodePng(pixels.data(), 512, 512, 3, /*compression_level=*/1);
#ifndef DMDSERVE_WORKER_IMAGE_CODEC_H_
#define DMDSERVE_WORKER_IMAGE_CODEC_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace dmdserve {

// Largest width or height EncodePng (and the test-only DecodePng) accepts, in pixels.
inline constexpr int kMaxPngDimension = 1 << 16;

// Encodes `pixels` (uint8, height x width x channels, row-major HWC, no row padding; the caller
// keeps ownership and the buffer must hold width * height * channels bytes) as an 8-bit,
// non-interlaced PNG: colour type grey for channels == 1, RGB for channels == 3.
// compression_level is zlib's: 0 (store, fastest) .. 9 (smallest).
// INVALID_ARGUMENT names the argument at fault (null pixels, width/height outside
// 1..kMaxPngDimension, channels not 1 or 3, compression_level outside 0..9); INTERNAL carries a
// libpng error message.
absl::StatusOr<std::string> EncodePng(const uint8_t* pixels, int width, int height, int channels,
                                      int compression_level);

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_IMAGE_CODEC_H_
