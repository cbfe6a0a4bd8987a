#include "server/http_routes.h"

#include <vector>

#include "absl/strings/str_join.h"

namespace dmdserve {
namespace {

constexpr char kGetHead[] = "GET, HEAD";
constexpr char kPost[] = "POST";

constexpr HttpRoute kRoutes[] = {
    {"/v1/images/generations", HttpCall::kImagesGenerations, RpcMethod::kHttpImagesGenerations,
     kPost, ErrorStyle::kOpenAi},
    {"/v1/models", HttpCall::kOpenAiModels, RpcMethod::kHttpListModels, kGetHead,
     ErrorStyle::kOpenAi},
    {"/v1/generate", HttpCall::kGenerate, RpcMethod::kHttpGenerate, kPost, ErrorStyle::kNative},
    {"/v1/generate:stream", HttpCall::kGenerateStream, RpcMethod::kHttpGenerateStream, kPost,
     ErrorStyle::kNative},
    {"/v1/models:list", HttpCall::kListModels, RpcMethod::kHttpNativeListModels, kPost,
     ErrorStyle::kNative},
    {"/v1/tokenize", HttpCall::kTokenize, RpcMethod::kHttpTokenize, kPost, ErrorStyle::kNative},
};

}  // namespace

const HttpRoute* FindHttpRoute(absl::string_view path) {
  for (const HttpRoute& route : kRoutes) {
    if (route.path == path) return &route;
  }
  return nullptr;
}

bool Allows(const HttpRoute& route, absl::string_view verb) {
  if (absl::string_view(route.allow) == kPost) return verb == "POST";
  return verb == "GET" || verb == "HEAD";
}

std::string HttpRoutePaths() {
  std::vector<absl::string_view> paths;
  for (const HttpRoute& route : kRoutes) paths.push_back(route.path);
  return absl::StrJoin(paths, ", ");
}

}  // namespace dmdserve
