// ThreadSanitizer view of absl::Status reference counting in Debian's uninstrumented abseil.
//
// Linked into every executable of a DMDSERVE_SANITIZE=thread build (CMakeLists.txt), with
// tsan_absl_mutex.cc, never into a normal one. A non-OK absl::Status points at a shared,
// reference-counted StatusRep. Copying one takes a reference in an inline header function
// (Status::Ref: a relaxed fetch_add, compiled into our instrumented code), but dropping one calls
// Status::UnrefNonInlined in libabsl_status.so, whose acq_rel decrement and `delete` TSan cannot
// see. So when a worker thread copies a failed batch's status for each request and the thread that
// drops the last reference later frees it, TSan reports the worker's increment racing with the
// free, though the decrement chain orders them. (engine_test reported exactly this.)
//
// How: this file defines Status::UnrefNonInlined itself, as abseil does (decrement with acq_rel,
// delete at zero), in instrumented code. The executable exports it (CMakeLists.txt), so the calls
// from our code and from the shared libraries' inline Status destructors land here and TSan sees
// the synchronisation. A reference dropped inside libabsl_status.so itself, if any call there does
// not go through the PLT, stays invisible as before: it is the same atomic counter, so mixing the
// two is correct, merely unannotated.
#include <atomic>
#include <cstdint>

#include "absl/base/options.h"
#include "absl/status/status.h"

#if !defined(__SANITIZE_THREAD__)
#error "tsan_absl_status.cc is only for -fsanitize=thread builds (gcc defines __SANITIZE_THREAD__)"
#endif

namespace absl {
ABSL_NAMESPACE_BEGIN

void Status::UnrefNonInlined(uintptr_t rep) {
  status_internal::StatusRep* r = RepToPointer(rep);
  if (r->ref.fetch_sub(1, std::memory_order_acq_rel) == 1) delete r;
}

ABSL_NAMESPACE_END
}  // namespace absl
