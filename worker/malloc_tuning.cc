#include "worker/malloc_tuning.h"

#include <malloc.h>

#include <limits>

#include "absl/strings/str_cat.h"

namespace dmdserve {
namespace {

// The sanitizers whose runtime brings its own malloc (and a mallopt that refuses everything).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitizerMalloc = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
constexpr bool kSanitizerMalloc = true;
#else
constexpr bool kSanitizerMalloc = false;
#endif
#else
constexpr bool kSanitizerMalloc = false;
#endif

// mallopt takes an int; values past INT_MAX are refused here rather than wrapped.
absl::Status Set(int param, const char* name, size_t bytes) {
  if (bytes > static_cast<size_t>(std::numeric_limits<int>::max()) ||
      (!kSanitizerMalloc && mallopt(param, static_cast<int>(bytes)) != 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("MallocTuning.", name, ": glibc refused ", bytes, " bytes"));
  }
  return absl::OkStatus();
}

}  // namespace

bool MallocTuningApplies() { return !kSanitizerMalloc; }

absl::Status ApplyMallocTuning(const MallocTuning& tuning) {
  if (absl::Status s = Set(M_MMAP_THRESHOLD, "mmap_threshold_bytes", tuning.mmap_threshold_bytes);
      !s.ok()) {
    return s;
  }
  return Set(M_TRIM_THRESHOLD, "trim_threshold_bytes", tuning.trim_threshold_bytes);
}

}  // namespace dmdserve
