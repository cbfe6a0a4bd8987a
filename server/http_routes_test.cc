#include "server/http_routes.h"

#include <gtest/gtest.h>

namespace dmdserve {
namespace {

TEST(HttpRoutesTest, EveryNativeRpcHasARouteWithItsOwnMethodLabel) {
  const struct {
    const char* path;
    HttpCall call;
    RpcMethod method;
    const char* label;
  } cases[] = {
      {"/v1/generate", HttpCall::kGenerate, RpcMethod::kHttpGenerate, "POST /v1/generate"},
      {"/v1/generate:stream", HttpCall::kGenerateStream, RpcMethod::kHttpGenerateStream,
       "POST /v1/generate:stream"},
      {"/v1/models:list", HttpCall::kListModels, RpcMethod::kHttpNativeListModels,
       "POST /v1/models:list"},
      {"/v1/tokenize", HttpCall::kTokenize, RpcMethod::kHttpTokenize, "POST /v1/tokenize"},
  };
  for (const auto& c : cases) {
    const HttpRoute* route = FindHttpRoute(c.path);
    ASSERT_NE(route, nullptr) << c.path;
    EXPECT_EQ(route->call, c.call) << c.path;
    EXPECT_EQ(route->method, c.method) << c.path;
    EXPECT_EQ(RpcMethodName(route->method), c.label);
    EXPECT_EQ(route->errors, ErrorStyle::kNative) << c.path;
    EXPECT_TRUE(Allows(*route, "POST")) << c.path;
    EXPECT_FALSE(Allows(*route, "GET")) << c.path;
    EXPECT_STREQ(route->allow, "POST");
  }
}

TEST(HttpRoutesTest, OpenAiRoutesKeepTheirShape) {
  const HttpRoute* models = FindHttpRoute("/v1/models");
  ASSERT_NE(models, nullptr);
  EXPECT_EQ(models->call, HttpCall::kOpenAiModels);
  EXPECT_EQ(models->errors, ErrorStyle::kOpenAi);
  EXPECT_TRUE(Allows(*models, "GET"));
  EXPECT_TRUE(Allows(*models, "HEAD"));
  EXPECT_FALSE(Allows(*models, "POST"));
  const HttpRoute* images = FindHttpRoute("/v1/images/generations");
  ASSERT_NE(images, nullptr);
  EXPECT_EQ(images->method, RpcMethod::kHttpImagesGenerations);
  EXPECT_EQ(images->errors, ErrorStyle::kOpenAi);
}

TEST(HttpRoutesTest, OnlyExactPathsMatch) {
  for (const char* path : {"/", "/v1", "/v1/generate/", "/v1/generate:streamx", "/V1/generate",
                           "/v1/models:list?x=1", ""}) {
    EXPECT_EQ(FindHttpRoute(path), nullptr) << path;
  }
  EXPECT_NE(HttpRoutePaths().find("/v1/generate:stream"), std::string::npos);
}

}  // namespace
}  // namespace dmdserve
