// libpng plumbing shared by EncodePng (worker/image_codec.cc) and the test-only DecodePng
// (worker/testing/png_decode.cc): the per-call state the callbacks see and the error callbacks.
// Not part of worker/'s API. Defined in worker/image_codec.cc.
#ifndef DMDSERVE_WORKER_PNG_INTERNAL_H_
#define DMDSERVE_WORKER_PNG_INTERNAL_H_

#include <png.h>

#include <cstddef>
#include <string>
#include <string_view>

namespace dmdserve::png_internal {

// State shared with the libpng callbacks of one call. It lives in the caller's frame, outside the
// setjmp/longjmp region, and the callbacks never create objects that a longjmp would skip.
struct PngIo {
  std::string* out = nullptr;  // EncodePng: where the bytes go
  std::string_view in;         // DecodePng: the PNG being read
  size_t offset = 0;           // DecodePng: bytes of `in` consumed
  // First libpng error and warning messages (fixed size, so recording them cannot throw).
  char error[256] = {};
  char warning[256] = {};
};

// libpng's error and warning callbacks; their error pointer must be the call's PngIo. OnError
// records the first error and longjmps back to the caller's setjmp; OnWarning records the first
// warning.
void OnError(png_structp png, png_const_charp message);
void OnWarning(png_structp png, png_const_charp message);

// "<error>", or "<error> (after warning: <warning>)": libpng often explains an error in a warning
// just before it (e.g. "Image width exceeds user limit in IHDR" before "Invalid IHDR data").
std::string LibpngMessage(const PngIo& io);

}  // namespace dmdserve::png_internal

#endif  // DMDSERVE_WORKER_PNG_INTERNAL_H_
