#include "worker/testing/png_decode.h"

#include <png.h>

#include <cstddef>
#include <cstring>
#include <new>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "worker/image_codec.h"
#include "worker/png_internal.h"

namespace dmdserve {
namespace {

using png_internal::LibpngMessage;
using png_internal::PngIo;

// Largest decoded image DecodePng allocates, in bytes (bounds memory for hostile headers).
constexpr size_t kMaxDecodedBytes = size_t{1} << 28;

void OnRead(png_structp png, png_bytep data, png_size_t length) {
  auto* io = static_cast<PngIo*>(png_get_io_ptr(png));
  if (io->in.size() - io->offset < length) png_error(png, "truncated PNG: unexpected end of data");
  std::memcpy(data, io->in.data() + io->offset, length);
  io->offset += length;
}

// Owns the libpng structures of one call; destroying them is safe in every state.
struct ReadStructs {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~ReadStructs() { png_destroy_read_struct(&png, &info, nullptr); }
};

// Image layout after the transformations DecodePng asks for.
struct ReadLayout {
  png_uint_32 width = 0;
  png_uint_32 height = 0;
  int channels = 0;
  int bit_depth = 0;
  int passes = 0;
  size_t row_bytes = 0;
};

// The functions below call libpng after setjmp. They hold only trivially destructible locals, so
// a longjmp back to their setjmp skips no destructor. They return false after a libpng error.

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

absl::StatusOr<DecodedImage> DecodePng(std::string_view png) {
  if (png.size() < 8 || png_sig_cmp(reinterpret_cast<png_const_bytep>(png.data()), 0, 8) != 0) {
    return absl::InvalidArgumentError("DecodePng: not a PNG (missing the 8-byte PNG signature)");
  }
  PngIo io;
  io.in = png;
  ReadStructs s;
  s.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &io, png_internal::OnError,
                                 png_internal::OnWarning);
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
