// PNG encoding and decoding of 8-bit grey or RGB images in memory, with libpng.
//
// Both functions are reentrant (no shared state; each call owns its libpng structures) and never
// throw or abort: libpng errors are caught with setjmp/longjmp inside the call and returned as
// statuses. Example:
//
//   absl::StatusOr<std::string> png = EncodePng(pixels.data(), 512, 512, 3,
//   /*compression_level=*/1); absl::StatusOr<DecodedImage> image = DecodePng(*png);   //
//   image->pixels == pixels
#ifndef DMDSERVE_WORKER_IMAGE_CODEC_H_
#define DMDSERVE_WORKER_IMAGE_CODEC_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace dmdserve {

// Largest width or height either function accepts, in pixels.
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

// An 8-bit image with its pixels in row-major HWC order (height * width * channels bytes).
struct DecodedImage {
  int width = 0;
  int height = 0;
  int channels = 0;  // 1 (grey) or 3 (RGB)
  std::string pixels;
};

// Decodes any PNG into 8-bit grey (grey and grey+alpha sources) or RGB (RGB, RGBA and palette
// sources): 16-bit samples are reduced to 8 bits, sub-byte grey is expanded, alpha is dropped,
// interlacing is undone. Meant for tests and tools, not the serving path.
// INVALID_ARGUMENT for anything that is not a complete, valid PNG (bad signature, truncation,
// CRC or zlib errors), whose width or height exceeds kMaxPngDimension or whose decoded pixels
// would exceed 256 MiB. RESOURCE_EXHAUSTED when memory runs out.
absl::StatusOr<DecodedImage> DecodePng(std::string_view png);

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_IMAGE_CODEC_H_
