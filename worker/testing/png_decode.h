// PNG decoding for tests: turns the PNG files the engine serves back into pixels, with libpng.
// Test-only (CMake target dmdserve_image_testing, linked by tests alone); the serving path only
// encodes (worker/image_codec.h).
//
// Reentrant (no shared state; each call owns its libpng structures); never throws or aborts:
// libpng errors are caught with setjmp/longjmp inside the call and returned as statuses. Example:
//
//   absl::StatusOr<std::string> png = EncodePng(pixels.data(), 512, 512, 3, /*level=*/1);
//   absl::StatusOr<DecodedImage> image = DecodePng(*png);  // image->pixels == pixels
#ifndef DMDSERVE_WORKER_TESTING_PNG_DECODE_H_
#define DMDSERVE_WORKER_TESTING_PNG_DECODE_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace dmdserve {

// An 8-bit image with its pixels in row-major HWC order (height * width * channels bytes).
struct DecodedImage {
  int width = 0;
  int height = 0;
  int channels = 0;  // 1 (grey) or 3 (RGB)
  std::string pixels;
};

// Decodes any PNG into 8-bit grey (grey and grey+alpha sources) or RGB (RGB, RGBA and palette
// sources): 16-bit samples are reduced to 8 bits, sub-byte grey is expanded, alpha is dropped,
// interlacing is undone.
// INVALID_ARGUMENT for anything that is not a complete, valid PNG (bad signature, truncation,
// CRC or zlib errors), whose width or height exceeds kMaxPngDimension (worker/image_codec.h) or
// whose decoded pixels would exceed 256 MiB. RESOURCE_EXHAUSTED when memory runs out.
absl::StatusOr<DecodedImage> DecodePng(std::string_view png);

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_TESTING_PNG_DECODE_H_
