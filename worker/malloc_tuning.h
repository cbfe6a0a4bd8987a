// Process-wide glibc malloc settings for serving: keep freed memory in the process.
//
// glibc serves blocks above its mmap threshold (128 KiB at start, adjusted up to 32 MiB as
// freed mmapped blocks are seen) with their own mmap and returns the top of the heap to the
// kernel once more than the trim threshold (128 KiB) is free there. A model worker allocates and
// frees the same megabytes of activations every batch, so with the defaults each batch pays for
// fresh pages: page faults and zeroing (a quarter of the CPU time at saturation on the 2-core
// development machine, docs/PERFORMANCE.md "Memory allocator"). Raising both thresholds keeps
// those pages in the process, to be reused by the next batch.
//
// Only glibc's allocator is tuned; under another allocator (e.g. jemalloc preloaded), the calls
// change glibc's unused settings and nothing else. In a sanitizer build (ASan, TSan, MSan:
// DMDSERVE_SANITIZE), whose runtime replaces malloc and answers every mallopt with a refusal,
// there is nothing to tune: ApplyMallocTuning checks the values and changes nothing. Not
// thread-safe against concurrent mallopt callers: call at start-up.
#ifndef DMDSERVE_WORKER_MALLOC_TUNING_H_
#define DMDSERVE_WORKER_MALLOC_TUNING_H_

#include <cstddef>

#include "absl/status/status.h"

namespace dmdserve {

struct MallocTuning {
  // Blocks of at least this many bytes get their own mmap (and go back to the kernel when
  // freed). Default 32 MiB, the most glibc's own adjustment would reach: a batch's activations
  // stay on the heap from the first batch on.
  size_t mmap_threshold_bytes = size_t{32} << 20;
  // The heap's top is returned to the kernel once more than this many bytes are free there.
  // Default 256 MiB: enough for the activations of the largest batches of our bundles.
  size_t trim_threshold_bytes = size_t{256} << 20;
};

// Applies `tuning` to glibc's malloc (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD; this also
// turns off glibc's own adjustment of both), for the whole process. INVALID_ARGUMENT naming the
// setting for a value mallopt cannot take (over INT_MAX bytes) or that glibc refuses.
absl::Status ApplyMallocTuning(const MallocTuning& tuning);

// False in a sanitizer build, where malloc is the sanitizer's and ApplyMallocTuning changes
// nothing.
bool MallocTuningApplies();

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_MALLOC_TUNING_H_
