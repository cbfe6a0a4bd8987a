#include "server/static_assets.h"

namespace dmdserve {
namespace {

// (std::string_view: the generated table's type, which Debian's Abseil does not alias.)
bool EndsWith(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.substr(text.size() - suffix.size()) == suffix;
}

constexpr std::string_view kIndexName = "index.html";
constexpr std::string_view kPrefix = "/playground/";

std::string_view ContentTypeOf(std::string_view name) {
  if (EndsWith(name, ".html")) return "text/html; charset=utf-8";
  if (EndsWith(name, ".js")) return "text/javascript; charset=utf-8";
  if (EndsWith(name, ".css")) return "text/css; charset=utf-8";
  if (EndsWith(name, ".png")) return "image/png";
  if (EndsWith(name, ".svg")) return "image/svg+xml";
  return "application/octet-stream";
}

}  // namespace

std::optional<StaticAsset> FindStaticAsset(std::string_view path) {
  std::string_view name;
  if (path == "/") {
    name = kIndexName;
  } else if (path.substr(0, kPrefix.size()) == kPrefix) {
    name = path.substr(kPrefix.size());
  } else {
    return std::nullopt;
  }
  // Exact names only: "..", "a/b" or "" never match an embedded file.
  for (size_t i = 0; i < kPlaygroundFiles_count; ++i) {
    const EmbeddedFile& file = kPlaygroundFiles[i];
    if (file.name == name) return StaticAsset{file.name, ContentTypeOf(file.name), file.bytes};
  }
  return std::nullopt;
}

}  // namespace dmdserve
