#include "worker/html_entities.h"

#include <algorithm>
#include <iterator>

namespace dmdserve {
namespace text_cleanup {
namespace {

// Sorted by name (byte order), which FindHtmlEntity's binary search relies on.
constexpr HtmlEntity kHtmlEntities[] = {
#include "worker/html_entities.inc"
};

}  // namespace

const HtmlEntity* FindHtmlEntity(std::string_view name) {
  const auto it = std::lower_bound(std::begin(kHtmlEntities), std::end(kHtmlEntities), name,
                                   [](const HtmlEntity& entity, std::string_view key) {
                                     return std::string_view(entity.name) < key;
                                   });
  return it != std::end(kHtmlEntities) && std::string_view(it->name) == name ? it : nullptr;
}

}  // namespace text_cleanup
}  // namespace dmdserve
