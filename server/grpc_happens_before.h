// Orderings that gRPC guarantees to a callback reactor, told to ThreadSanitizer.
//
// gRPC runs a reactor's reactions on its own threads and orders them after the operations that
// caused them: everything before Finish() happens before OnDone(), everything before
// StartWrite() happens before its OnWriteDone(). It hands the call between threads inside
// Debian's uninstrumented libgrpc (atomics, lock-free queues), which TSan cannot see, so a
// reactor deleted in OnDone would be reported as racing with the writes made before Finish() on
// another thread. The reactor marks each such point: ReleaseToGrpc(this) just before Finish() or
// StartWrite(), AcquireFromGrpc(this) first thing in OnDone() or OnWriteDone(). Only the
// ordering gRPC documents is declared; any access outside it is still checked.
//
// No-ops (and no code) outside a -fsanitize=thread build. Thread-safe.
#ifndef DMDSERVE_SERVER_GRPC_HAPPENS_BEFORE_H_
#define DMDSERVE_SERVER_GRPC_HAPPENS_BEFORE_H_

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

namespace dmdserve {

// Everything this thread did so far happens before a later AcquireFromGrpc(`reactor`).
inline void ReleaseToGrpc(const void* reactor) {
#if defined(__SANITIZE_THREAD__)
  __tsan_release(const_cast<void*>(reactor));
#else
  (void)reactor;
#endif
}

// What threads did before their ReleaseToGrpc(`reactor`) happens before what this thread does next.
inline void AcquireFromGrpc(const void* reactor) {
#if defined(__SANITIZE_THREAD__)
  __tsan_acquire(const_cast<void*>(reactor));
#else
  (void)reactor;
#endif
}

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_GRPC_HAPPENS_BEFORE_H_
