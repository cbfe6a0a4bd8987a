#include "worker/image_codec.h"

#include <png.h>

#include <cstddef>
#include <cstring>
#include <new>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "worker/png_internal.h"

namespace dmdserve {
namespace png_internal {

void OnError(png_structp png, png_const_charp message) {
  auto* io = static_cast<PngIo*>(png_get_error_ptr(png));
  if (io->error[0] == '\0') {
    std::strncpy(io->error, message, sizeof(io->error) - 1);
  }
  png_longjmp(png, 1);
}

void OnWarning(png_structp png, png_const_charp message) {
  auto* io = static_cast<PngIo*>(png_get_error_ptr(png));
  if (io->warning[0] == '\0') {
    std::strncpy(io->warning, message, sizeof(io->warning) - 1);
  }
}

std::string LibpngMessage(const PngIo& io) {
  if (io.warning[0] == '\0') return io.error;
  return absl::StrCat(io.error, " (after warning: ", io.warning, ")");
}

}  // namespace png_internal

namespace {

using png_internal::PngIo;

void OnWrite(png_structp png, png_bytep data, png_size_t length) {
  auto* io = static_cast<PngIo*>(png_get_io_ptr(png));
  bool ok = true;
  try {
    io->out->append(reinterpret_cast<const char*>(data), length);
  } catch (const std::bad_alloc&) {
    ok = false;
  }
  if (!ok) png_error(png, "out of memory while writing the PNG");
}

void OnFlush(png_structp) {}

// Owns the libpng structures of one call; destroying them is safe in every state.
struct WriteStructs {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~WriteStructs() { png_destroy_write_struct(&png, &info); }
};

// The functions below call libpng after setjmp. They hold only trivially destructible locals, so
// a longjmp back to their setjmp skips no destructor. They return false after a libpng error.

bool WriteImage(png_structp png, png_infop info, PngIo* io, const uint8_t* pixels, int width,
                int height, int channels, int compression_level) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_set_write_fn(png, io, OnWrite, OnFlush);
  png_set_compression_level(png, compression_level);
  // Filtering only helps compression; with stored (level 0) data it is wasted work.
  if (compression_level == 0) png_set_filter(png, PNG_FILTER_TYPE_BASE, PNG_FILTER_NONE);
  png_set_IHDR(png, info, static_cast<png_uint_32>(width), static_cast<png_uint_32>(height), 8,
               channels == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  const size_t stride = static_cast<size_t>(width) * channels;
  for (int y = 0; y < height; ++y) png_write_row(png, pixels + y * stride);
  png_write_end(png, nullptr);
  return true;
}

}  // namespace

absl::StatusOr<std::string> EncodePng(const uint8_t* pixels, int width, int height, int channels,
                                      int compression_level) {
  if (pixels == nullptr) return absl::InvalidArgumentError("EncodePng: pixels is null");
  if (width < 1 || width > kMaxPngDimension) {
    return absl::InvalidArgumentError(
        absl::StrCat("EncodePng: width ", width, " is outside 1..", kMaxPngDimension));
  }
  if (height < 1 || height > kMaxPngDimension) {
    return absl::InvalidArgumentError(
        absl::StrCat("EncodePng: height ", height, " is outside 1..", kMaxPngDimension));
  }
  if (channels != 1 && channels != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("EncodePng: channels is ", channels, "; must be 1 (grey) or 3 (RGB)"));
  }
  if (compression_level < 0 || compression_level > 9) {
    return absl::InvalidArgumentError(
        absl::StrCat("EncodePng: compression_level ", compression_level, " is outside 0..9"));
  }

  std::string out;
  PngIo io;
  io.out = &out;
  WriteStructs s;
  s.png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &io, png_internal::OnError,
                                  png_internal::OnWarning);
  if (s.png != nullptr) s.info = png_create_info_struct(s.png);
  if (s.info == nullptr) return absl::ResourceExhaustedError("EncodePng: libpng out of memory");
  if (!WriteImage(s.png, s.info, &io, pixels, width, height, channels, compression_level)) {
    return absl::InternalError(
        absl::StrCat("EncodePng: libpng error: ", png_internal::LibpngMessage(io)));
  }
  return out;
}

}  // namespace dmdserve
