#include "worker/image_codec.h"

#include <zlib.h>

#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/testing/png_decode.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;

constexpr char kSignature[] = "\x89PNG\r\n\x1a\n";

std::vector<uint8_t> RandomPixels(int width, int height, int channels, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> pixels(static_cast<size_t>(width) * height * channels);
  for (uint8_t& p : pixels) p = static_cast<uint8_t>(byte(rng));
  return pixels;
}

uint32_t BigEndian32(const std::string& s, size_t offset) {
  return static_cast<uint32_t>(static_cast<uint8_t>(s[offset])) << 24 |
         static_cast<uint32_t>(static_cast<uint8_t>(s[offset + 1])) << 16 |
         static_cast<uint32_t>(static_cast<uint8_t>(s[offset + 2])) << 8 |
         static_cast<uint32_t>(static_cast<uint8_t>(s[offset + 3]));
}

struct Chunk {
  std::string type;
  std::string data;
};

// Splits a PNG into chunks without libpng, checking each chunk's CRC with zlib.
std::vector<Chunk> SplitChunks(const std::string& png) {
  std::vector<Chunk> chunks;
  size_t pos = 8;
  while (pos + 12 <= png.size()) {
    const uint32_t length = BigEndian32(png, pos);
    EXPECT_LE(pos + 12 + length, png.size());
    if (pos + 12 + length > png.size()) break;
    Chunk chunk{png.substr(pos + 4, 4), png.substr(pos + 8, length)};
    const std::string typed = chunk.type + chunk.data;
    const uint32_t crc =
        crc32(0, reinterpret_cast<const Bytef*>(typed.data()), static_cast<uInt>(typed.size()));
    EXPECT_EQ(crc, BigEndian32(png, pos + 8 + length)) << "CRC of chunk " << chunk.type;
    chunks.push_back(std::move(chunk));
    pos += 12 + length;
  }
  EXPECT_EQ(pos, png.size()) << "trailing bytes after the last chunk";
  return chunks;
}

class RoundTripTest : public ::testing::TestWithParam<std::tuple<int, int, int, int>> {};

TEST_P(RoundTripTest, DecodeGivesBackThePixels) {
  const auto [width, height, channels, level] = GetParam();
  const std::vector<uint8_t> pixels =
      RandomPixels(width, height, channels, static_cast<uint32_t>(width * 1000 + height));

  absl::StatusOr<std::string> png = EncodePng(pixels.data(), width, height, channels, level);
  ASSERT_TRUE(png.ok()) << png.status();
  EXPECT_EQ(png->substr(0, 8), std::string(kSignature, 8));

  absl::StatusOr<DecodedImage> image = DecodePng(*png);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->width, width);
  EXPECT_EQ(image->height, height);
  EXPECT_EQ(image->channels, channels);
  EXPECT_EQ(image->pixels, std::string(pixels.begin(), pixels.end()));
}

INSTANTIATE_TEST_SUITE_P(SizesChannelsLevels, RoundTripTest,
                         ::testing::Combine(::testing::Values(1, 7, 32),   // width
                                            ::testing::Values(1, 13, 32),  // height
                                            ::testing::Values(1, 3),       // channels
                                            ::testing::Values(0, 1, 9)));  // compression level

// Reads an uncompressed (level 0) PNG with zlib only, independently of libpng: IHDR fields,
// one IDAT stream whose rows are filter type 0 followed by the pixels, then IEND.
TEST(EncodePngTest, StoredPngMatchesTheFormatByHand) {
  constexpr int kWidth = 7, kHeight = 13, kChannels = 3;
  const std::vector<uint8_t> pixels = RandomPixels(kWidth, kHeight, kChannels, 7);
  absl::StatusOr<std::string> png = EncodePng(pixels.data(), kWidth, kHeight, kChannels, 0);
  ASSERT_TRUE(png.ok()) << png.status();

  const std::vector<Chunk> chunks = SplitChunks(*png);
  ASSERT_GE(chunks.size(), 3u);
  ASSERT_EQ(chunks.front().type, "IHDR");
  const std::string& ihdr = chunks.front().data;
  ASSERT_EQ(ihdr.size(), 13u);
  EXPECT_EQ(BigEndian32(ihdr, 0), static_cast<uint32_t>(kWidth));
  EXPECT_EQ(BigEndian32(ihdr, 4), static_cast<uint32_t>(kHeight));
  EXPECT_EQ(ihdr[8], 8);   // bit depth
  EXPECT_EQ(ihdr[9], 2);   // colour type RGB
  EXPECT_EQ(ihdr[12], 0);  // not interlaced
  EXPECT_EQ(chunks.back().type, "IEND");

  std::string idat;
  for (const Chunk& c : chunks) {
    if (c.type == "IDAT") idat += c.data;
  }
  const size_t stride = kWidth * kChannels;
  std::string raw(kHeight * (stride + 1), '\0');
  uLongf raw_size = raw.size();
  ASSERT_EQ(uncompress(reinterpret_cast<Bytef*>(raw.data()), &raw_size,
                       reinterpret_cast<const Bytef*>(idat.data()), idat.size()),
            Z_OK);
  ASSERT_EQ(raw_size, raw.size());
  for (int y = 0; y < kHeight; ++y) {
    EXPECT_EQ(raw[y * (stride + 1)], 0) << "filter type of row " << y;
    EXPECT_EQ(raw.substr(y * (stride + 1) + 1, stride),
              std::string(pixels.begin() + y * stride, pixels.begin() + (y + 1) * stride))
        << "row " << y;
  }
}

TEST(EncodePngTest, GreyImageHasGreyColourType) {
  const std::vector<uint8_t> pixels = RandomPixels(4, 4, 1, 1);
  absl::StatusOr<std::string> png = EncodePng(pixels.data(), 4, 4, 1, 6);
  ASSERT_TRUE(png.ok()) << png.status();
  const std::vector<Chunk> chunks = SplitChunks(*png);
  ASSERT_FALSE(chunks.empty());
  EXPECT_EQ(chunks.front().data[9], 0);  // colour type grey
}

TEST(EncodePngTest, HigherCompressionIsSmallerOnCompressibleImages) {
  std::vector<uint8_t> pixels(64 * 64 * 3);
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>((i / 3) % 64);
  absl::StatusOr<std::string> stored = EncodePng(pixels.data(), 64, 64, 3, 0);
  absl::StatusOr<std::string> best = EncodePng(pixels.data(), 64, 64, 3, 9);
  ASSERT_TRUE(stored.ok() && best.ok());
  EXPECT_GT(stored->size(), pixels.size());  // stored data plus headers
  EXPECT_LT(best->size(), stored->size() / 4);
}

TEST(EncodePngTest, RejectsBadArguments) {
  const std::vector<uint8_t> pixels(3 * 4 * 4, 0);
  struct Case {
    const uint8_t* pixels;
    int width, height, channels, level;
    const char* message;
  };
  const Case cases[] = {
      {nullptr, 4, 4, 3, 1, "pixels is null"},
      {pixels.data(), 0, 4, 3, 1, "width 0"},
      {pixels.data(), -4, 4, 3, 1, "width -4"},
      {pixels.data(), kMaxPngDimension + 1, 1, 1, 1, "width 65537"},
      {pixels.data(), 4, 0, 3, 1, "height 0"},
      {pixels.data(), 4, kMaxPngDimension + 1, 1, 1, "height 65537"},
      {pixels.data(), 4, 4, 2, 1, "channels is 2"},
      {pixels.data(), 4, 4, 4, 1, "channels is 4"},
      {pixels.data(), 4, 4, 3, -1, "compression_level -1"},
      {pixels.data(), 4, 4, 3, 10, "compression_level 10"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::string> png = EncodePng(c.pixels, c.width, c.height, c.channels, c.level);
    EXPECT_EQ(png.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(png.status().message(), HasSubstr(c.message));
  }
}

// PNGs written by a separate encoder (Python's zlib and struct modules, filter type 0) with
// pixel values chosen by hand.
TEST(DecodePngTest, DecodesRgbFromAnotherEncoder) {
  const std::string png(
      "\x89\x50\x4e\x47\x0d\x0a\x1a\x0a\x00\x00\x00\x0d\x49\x48\x44\x52\x00\x00\x00\x02\x00\x00\x00"
      "\x02\x08\x02\x00\x00\x00\xfd\xd4\x9a\x73\x00\x00\x00\x13\x49\x44\x41\x54\x78\x9c\x63\xf8\xcf"
      "\xc0\xc0\x00\xc2\x0c\xff\xb9\x44\xe4\x00\x1a\x58\x03\x3a\x56\x63\xa2\x3c\x00\x00\x00\x00\x49"
      "\x45\x4e\x44\xae\x42\x60\x82",
      77);
  absl::StatusOr<DecodedImage> image = DecodePng(png);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->width, 2);
  EXPECT_EQ(image->height, 2);
  EXPECT_EQ(image->channels, 3);
  EXPECT_EQ(image->pixels, std::string("\xff\x00\x00\x00\xff\x00\x00\x00\xff\x0a\x14\x1e", 12));
}

TEST(DecodePngTest, DropsAlphaOfGreyAlpha) {
  // 3x1 grey+alpha: (5, 255), (100, 0), (200, 128).
  const std::string png(
      "\x89\x50\x4e\x47\x0d\x0a\x1a\x0a\x00\x00\x00\x0d\x49\x48\x44\x52\x00\x00\x00\x03\x00\x00\x00"
      "\x01\x08\x04\x00\x00\x00\xb1\xe9\xdc\x3f\x00\x00\x00\x0f\x49\x44\x41\x54\x78\x9c\x63\x60\xfd"
      "\x9f\xc2\x70\xa2\x01\x00\x08\xc0\x02\xb1\x2a\xd1\xb6\x3c\x00\x00\x00\x00\x49\x45\x4e\x44\xae"
      "\x42\x60\x82",
      73);
  absl::StatusOr<DecodedImage> image = DecodePng(png);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->channels, 1);
  EXPECT_EQ(image->pixels, std::string("\x05\x64\xc8", 3));
}

TEST(DecodePngTest, ExpandsOneBitGrey) {
  // 8x1, 1-bit grey, bits 10110001.
  const std::string png(
      "\x89\x50\x4e\x47\x0d\x0a\x1a\x0a\x00\x00\x00\x0d\x49\x48\x44\x52\x00\x00\x00\x08\x00\x00\x00"
      "\x01\x01\x00\x00\x00\x00\xcb\x7b\xd2\xee\x00\x00\x00\x0a\x49\x44\x41\x54\x78\x9c\x63\xd8\x08"
      "\x00\x00\xb3\x00\xb2\x21\x92\x51\xca\x00\x00\x00\x00\x49\x45\x4e\x44\xae\x42\x60\x82",
      68);
  absl::StatusOr<DecodedImage> image = DecodePng(png);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->width, 8);
  EXPECT_EQ(image->channels, 1);
  EXPECT_EQ(image->pixels, std::string("\xff\x00\xff\xff\x00\x00\x00\xff", 8));
}

TEST(DecodePngTest, RejectsGarbage) {
  for (const std::string& garbage :
       {std::string(), std::string("hello"), std::string(kSignature, 7), std::string(kSignature, 8),
        std::string(kSignature, 8) + std::string(100, '\x07'), std::string(1000, '\0')}) {
    absl::StatusOr<DecodedImage> image = DecodePng(garbage);
    EXPECT_EQ(image.status().code(), absl::StatusCode::kInvalidArgument)
        << "input of " << garbage.size() << " bytes";
  }
}

TEST(DecodePngTest, RejectsEveryTruncation) {
  const std::vector<uint8_t> pixels = RandomPixels(7, 13, 3, 3);
  absl::StatusOr<std::string> png = EncodePng(pixels.data(), 7, 13, 3, 1);
  ASSERT_TRUE(png.ok()) << png.status();
  for (size_t length = 0; length < png->size(); ++length) {
    absl::StatusOr<DecodedImage> image = DecodePng(std::string_view(*png).substr(0, length));
    EXPECT_EQ(image.status().code(), absl::StatusCode::kInvalidArgument) << "length " << length;
  }
}

TEST(DecodePngTest, RejectsCorruptImageData) {
  const std::vector<uint8_t> pixels = RandomPixels(32, 32, 3, 4);
  absl::StatusOr<std::string> png = EncodePng(pixels.data(), 32, 32, 3, 9);
  ASSERT_TRUE(png.ok()) << png.status();
  const size_t idat = png->find("IDAT");
  ASSERT_NE(idat, std::string::npos);
  const size_t idat_length = BigEndian32(*png, idat - 4);

  std::string bad_data = *png;
  bad_data[idat + 4] ^= 0x5a;  // first byte of the zlib stream (its header)
  absl::StatusOr<DecodedImage> image = DecodePng(bad_data);
  EXPECT_EQ(image.status().code(), absl::StatusCode::kInvalidArgument);

  std::string bad_crc = *png;
  bad_crc[idat + 4 + idat_length] ^= 0x01;  // first byte of the IDAT CRC
  image = DecodePng(bad_crc);
  EXPECT_EQ(image.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(image.status().message(), HasSubstr("CRC"));
}

// Builds a chunk: length, type, data, CRC computed with zlib.
std::string MakeChunk(const std::string& type, const std::string& data) {
  std::string chunk;
  for (int shift = 24; shift >= 0; shift -= 8) chunk += static_cast<char>(data.size() >> shift);
  const std::string typed = type + data;
  chunk += typed;
  const uint32_t crc =
      crc32(0, reinterpret_cast<const Bytef*>(typed.data()), static_cast<uInt>(typed.size()));
  for (int shift = 24; shift >= 0; shift -= 8) chunk += static_cast<char>((crc >> shift) & 0xff);
  return chunk;
}

TEST(DecodePngTest, RejectsHugeDimensionsWithoutAllocating) {
  // 65536 x 65536 RGB: 12 GiB decoded. The IDAT is empty; the size check comes first.
  const std::string ihdr("\x00\x01\x00\x00\x00\x01\x00\x00\x08\x02\x00\x00\x00", 13);
  const std::string png =
      std::string(kSignature, 8) + MakeChunk("IHDR", ihdr) + MakeChunk("IDAT", "");
  absl::StatusOr<DecodedImage> image = DecodePng(png);
  EXPECT_EQ(image.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(image.status().message(), HasSubstr("exceeds"));
}

TEST(DecodePngTest, RejectsDimensionsAboveTheLimit) {
  // 65537 x 1 grey.
  const std::string ihdr("\x00\x01\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00", 13);
  const std::string png =
      std::string(kSignature, 8) + MakeChunk("IHDR", ihdr) + MakeChunk("IDAT", "");
  absl::StatusOr<DecodedImage> image = DecodePng(png);
  EXPECT_EQ(image.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(image.status().message(), HasSubstr("width"));
}

}  // namespace
}  // namespace dmdserve
