// The playground's static files (server/playground/), embedded into the binary at build time
// (cmake/EmbedFiles.cmake writes their bytes into a generated source; nothing is read from disk
// at run time), and the URL paths and response headers they are served with.
//
// Paths: "/" is playground/index.html; "/playground/NAME" is playground/NAME. Pure lookups over
// immutable data; thread-safe.
#ifndef DMDSERVE_SERVER_STATIC_ASSETS_H_
#define DMDSERVE_SERVER_STATIC_ASSETS_H_

#include <cstddef>
#include <optional>
#include <string_view>

namespace dmdserve {

// One embedded file: its name in server/playground/ and its bytes.
struct EmbeddedFile {
  std::string_view name;
  std::string_view bytes;
};

// The generated table (build/server/playground_files.cc), in CMake's order.
extern const EmbeddedFile kPlaygroundFiles[];
extern const size_t kPlaygroundFiles_count;

// A file as served: its bytes and Content-Type (by extension: .html, .js, .css, .png, .svg;
// anything else application/octet-stream).
struct StaticAsset {
  std::string_view name;
  std::string_view content_type;
  std::string_view body;
};

// The embedded file served at `path` (the URL path, no query); nullopt when none.
std::optional<StaticAsset> FindStaticAsset(std::string_view path);

// The Content-Security-Policy of every static file: the page may load its own script, style and
// API responses only (no inline script, no other origin); images only from data: URLs (the
// generated PNGs); it may not be framed.
inline constexpr char kPlaygroundCsp[] =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_STATIC_ASSETS_H_
