#include "worker/image_codec.h"

#include <png.h>

#include <cstddef>
#include <cstring>
#include <new>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace dmdserve {
namespace {

// Largest decoded image DecodePng allocates, in bytes (bounds memory for hostile headers).
constexpr size_t kMaxDecodedBytes = size_t{1} << 28;

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

// "<error>", or "<error> (after warning: <warning>)": libpng often explains an error in a warning
// just before it (e.g. "Image width exceeds user limit in IHDR" before "Invalid IHDR data").
std::string LibpngMessage(const PngIo& io) {
  if (io.warning[0] == '\0') return io.error;
  return absl::StrCat(io.error, " (after warning: ", io.warning, ")");
}

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

void OnRead(png_structp png, png_bytep data, png_size_t length) {
  auto* io = static_cast<PngIo*>(png_get_io_ptr(png));
  if (io->in.size() - io->offset < length) png_error(png, "truncated PNG: unexpected end of data");
  std::memcpy(data, io->in.data() + io->offset, length);
  io->offset += length;
}

// Owns the libpng structures of one call; destroying them is safe in every state.
struct WriteStructs {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~WriteStructs() { png_destroy_write_struct(&png, &info); }
};

struct ReadStructs {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~ReadStructs() { png_destroy_read_struct(&png, &info, nullptr); }
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

// Image layout after the transformations DecodePng asks for.
struct ReadLayout {
  png_uint_32 width = 0;
  png_uint_32 height = 0;
  int channels = 0;
  int bit_depth = 0;
  int passes = 0;
  size_t row_bytes = 0;
};

bool ReadHeader(png_structp png, png_infop info, PngIo* io, ReadLayout* layout) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_set_read_fn(png, io, OnRead);
  png_set_user_limits(png, kMaxPngDimension, kMaxPngDimension);
  png_read_info(png, info);
  const int color_type = png_get_color_type(png, info);
  const int bit_depth = png_get_bit_depth(png, info);
  if (color_type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color_type == PNG_COLOR_TYPE_GRAY && bit_depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (bit_depth == 16) png_set_strip_16(png);
  png_set_strip_alpha(png);
  layout->passes = png_set_interlace_handling(png);
  png_read_update_info(png, info);
  layout->width = png_get_image_width(png, info);
  layout->height = png_get_image_height(png, info);
  layout->channels = png_get_channels(png, info);
  layout->bit_depth = png_get_bit_depth(png, info);
  layout->row_bytes = png_get_rowbytes(png, info);
  return true;
}

bool ReadRows(png_structp png, png_infop info, const ReadLayout* layout, uint8_t* pixels) {
  if (setjmp(png_jmpbuf(png))) return false;
  for (int pass = 0; pass < layout->passes; ++pass) {
    for (png_uint_32 y = 0; y < layout->height; ++y) {
      png_read_row(png, pixels + y * layout->row_bytes, nullptr);
    }
  }
  png_read_end(png, nullptr);  // reads up to IEND, so a truncated tail is an error too
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
  s.png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &io, OnError, OnWarning);
  if (s.png != nullptr) s.info = png_create_info_struct(s.png);
  if (s.info == nullptr) return absl::ResourceExhaustedError("EncodePng: libpng out of memory");
  if (!WriteImage(s.png, s.info, &io, pixels, width, height, channels, compression_level)) {
    return absl::InternalError(absl::StrCat("EncodePng: libpng error: ", LibpngMessage(io)));
  }
  return out;
}

absl::StatusOr<DecodedImage> DecodePng(std::string_view png) {
  if (png.size() < 8 || png_sig_cmp(reinterpret_cast<png_const_bytep>(png.data()), 0, 8) != 0) {
    return absl::InvalidArgumentError("DecodePng: not a PNG (missing the 8-byte PNG signature)");
  }
  PngIo io;
  io.in = png;
  ReadStructs s;
  s.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &io, OnError, OnWarning);
  if (s.png != nullptr) s.info = png_create_info_struct(s.png);
  if (s.info == nullptr) return absl::ResourceExhaustedError("DecodePng: libpng out of memory");

  ReadLayout layout;
  if (!ReadHeader(s.png, s.info, &io, &layout)) {
    return absl::InvalidArgumentError(absl::StrCat("DecodePng: invalid PNG: ", LibpngMessage(io)));
  }
  if ((layout.channels != 1 && layout.channels != 3) || layout.bit_depth != 8 ||
      layout.row_bytes != static_cast<size_t>(layout.width) * layout.channels) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodePng: unsupported PNG layout after conversion: ", layout.channels,
                     " channels, ", layout.bit_depth, "-bit"));
  }
  if (layout.row_bytes * layout.height > kMaxDecodedBytes) {
    return absl::InvalidArgumentError(absl::StrCat("DecodePng: ", layout.width, "x", layout.height,
                                                   " image exceeds ", kMaxDecodedBytes,
                                                   " decoded bytes"));
  }

  DecodedImage image;
  image.width = static_cast<int>(layout.width);
  image.height = static_cast<int>(layout.height);
  image.channels = layout.channels;
  try {
    image.pixels.resize(layout.row_bytes * layout.height);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("DecodePng: out of memory for the decoded pixels");
  }
  if (!ReadRows(s.png, s.info, &layout, reinterpret_cast<uint8_t*>(image.pixels.data()))) {
    return absl::InvalidArgumentError(absl::StrCat("DecodePng: invalid PNG: ", LibpngMessage(io)));
  }
  return image;
}

}  // namespace dmdserve
