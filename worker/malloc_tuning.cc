#include "worker/malloc_tuning.h"

#include <malloc.h>

#include <limits>

#include "absl/strings/str_cat.h"

namespace dmdserve {
namespace {

// mallopt takes an int; values past INT_MAX are refused here rather than wrapped.
absl::Status Set(int param, const char* name, size_t bytes) {
  if (bytes > static_cast<size_t>(std::numeric_limits<int>::max()) ||
      mallopt(param, static_cast<int>(bytes)) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("MallocTuning.", name, ": glibc refused ", bytes, " bytes"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ApplyMallocTuning(const MallocTuning& tuning) {
  if (absl::Status s = Set(M_MMAP_THRESHOLD, "mmap_threshold_bytes", tuning.mmap_threshold_bytes);
      !s.ok()) {
    return s;
  }
  return Set(M_TRIM_THRESHOLD, "trim_threshold_bytes", tuning.trim_threshold_bytes);
}

}  // namespace dmdserve
