#include "server/static_assets.h"

#include <gtest/gtest.h>

#include <fstream>
#include <regex>
#include <sstream>
#include <string>

namespace dmdserve {
namespace {

std::string SourceFile(const std::string& name) {
  std::ifstream in(std::string(DMDSERVE_SOURCE_DIR) + "/server/playground/" + name,
                   std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

TEST(StaticAssetsTest, ServesThePageAndItsFilesWithTheirTypes) {
  const struct {
    const char* path;
    const char* name;
    const char* content_type;
  } cases[] = {
      {"/", "index.html", "text/html; charset=utf-8"},
      {"/playground/index.html", "index.html", "text/html; charset=utf-8"},
      {"/playground/app.js", "app.js", "text/javascript; charset=utf-8"},
      {"/playground/style.css", "style.css", "text/css; charset=utf-8"},
  };
  for (const auto& c : cases) {
    std::optional<StaticAsset> asset = FindStaticAsset(c.path);
    ASSERT_TRUE(asset.has_value()) << c.path;
    EXPECT_EQ(asset->name, c.name);
    EXPECT_EQ(asset->content_type, c.content_type);
    // The embedded bytes are the repository's file, byte for byte.
    const std::string source = SourceFile(c.name);
    ASSERT_FALSE(source.empty()) << c.name;
    EXPECT_EQ(asset->body, source) << c.name;
  }
}

TEST(StaticAssetsTest, NothingElseIsServed) {
  for (const char* path : {"", "/index.html", "/playground", "/playground/", "/playground/nope.js",
                           "/playground/../server/main.cc", "/playground//app.js", "/v1/models"}) {
    EXPECT_FALSE(FindStaticAsset(path).has_value()) << path;
  }
}

TEST(StaticAssetsTest, PageNeedsNothingTheContentSecurityPolicyForbids) {
  const std::string csp = kPlaygroundCsp;
  EXPECT_EQ(csp.find("unsafe"), std::string::npos);
  EXPECT_NE(csp.find("default-src 'none'"), std::string::npos);
  EXPECT_NE(csp.find("frame-ancestors 'none'"), std::string::npos);
  const std::string html(FindStaticAsset("/")->body);
  // No inline script, style or event handler, and nothing from another origin.
  EXPECT_FALSE(std::regex_search(html, std::regex("<script(?![^>]*\\bsrc=)", std::regex::icase)));
  EXPECT_FALSE(
      std::regex_search(html, std::regex("<style|\\sstyle=|\\son[a-z]+=", std::regex::icase)));
  EXPECT_FALSE(std::regex_search(html, std::regex("(src|href)=\"(https?:)?//", std::regex::icase)));
  EXPECT_NE(html.find("src=\"/playground/app.js\""), std::string::npos);
}

}  // namespace
}  // namespace dmdserve
