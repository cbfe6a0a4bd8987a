// ThreadSanitizer annotations for Debian's uninstrumented abseil synchronisation primitives.
//
// Linked into every executable of a DMDSERVE_SANITIZE=thread build (CMakeLists.txt), never into
// a normal one. Debian's libabsl_synchronization is compiled without -fsanitize=thread, so the
// annotations abseil carries for TSan (ABSL_TSAN_MUTEX_*) are compiled out: absl::Mutex locks
// with atomics and futexes that TSan cannot see, and every access our code makes under an
// absl::Mutex would be reported as a data race. pthread mutexes need nothing of this: TSan
// intercepts them, also inside uninstrumented libraries.
//
// How: this file defines the exported absl::Mutex, absl::CondVar and absl::Notification member
// functions itself. The executable's definitions come first in the dynamic symbol lookup, so
// every call -- from our code and from the shared libraries that call abseil through the PLT
// (gRPC's gpr_mu and grpc_core::Mutex, abseil's own Notification) -- lands here; each one tells
// TSan what the operation does (__tsan_mutex_pre_lock/post_lock, ...) around the real abseil
// function, found with dlsym(RTLD_NEXT). The executable must export these symbols
// (-Wl,--export-dynamic-symbol, see CMakeLists.txt).
//
// The real call runs between a pre_* and the matching post_* annotation, where TSan ignores
// memory accesses: that is where abseil evaluates Condition predicates (possibly on the thread
// that unlocks), so their reads of guarded state are not checked -- as with abseil's own TSan
// build, which also evaluates them inside the mutex operation.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

#if !defined(__SANITIZE_THREAD__)
#error "tsan_absl_mutex.cc is only for -fsanitize=thread builds (gcc defines __SANITIZE_THREAD__)"
#endif
static_assert(ABSL_OPTION_USE_INLINE_NAMESPACE, "mangled names below assume an inline namespace");

namespace {

#define DMDSERVE_STR2(x) #x
#define DMDSERVE_STR(x) DMDSERVE_STR2(x)

// The real abseil function `qualified_tail` (the mangled name after "absl::<inline ns>::"),
// e.g. "5Mutex4LockEv"; `prefix` is "_ZN" or, for const member functions, "_ZNK".
template <typename Fn>
Fn Real(const char* prefix, const char* qualified_tail) {
  const char* ns = DMDSERVE_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  std::string name = std::string(prefix) + "4absl" + std::to_string(std::strlen(ns)) + ns +
                     qualified_tail;
  void* fn = dlsym(RTLD_NEXT, name.c_str());
  if (fn == nullptr) {
    std::fprintf(stderr, "tsan_absl_mutex: %s not found: %s\n", name.c_str(), dlerror());
    std::abort();
  }
  return reinterpret_cast<Fn>(fn);
}

#define REAL(Type, prefix, tail)                    \
  static const auto real = Real<Type>(prefix, tail); \
  (void)0

using absl::Condition;
using absl::CondVar;
using absl::Duration;
using absl::Mutex;
using absl::Notification;
using absl::Time;

// A wait that releases `mu` and holds it again on return (Await*, CondVar::Wait*): TSan sees the
// unlock before and the lock after, and ignores what the real call does in between.
template <typename F>
auto ReleaseAndReacquire(Mutex* mu, F&& wait) {
  __tsan_mutex_pre_unlock(mu, 0);
  __tsan_mutex_post_unlock(mu, 0);
  __tsan_mutex_pre_lock(mu, 0);
  auto result = wait();
  __tsan_mutex_post_lock(mu, 0, 0);
  return result;
}

// A lock that always ends with `mu` held (Lock, LockWhen*): `flags` 0 or __tsan_mutex_read_lock.
template <typename F>
auto Acquire(Mutex* mu, unsigned flags, F&& lock) {
  __tsan_mutex_pre_lock(mu, flags);
  auto result = lock();
  __tsan_mutex_post_lock(mu, flags, 0);
  return result;
}

bool TryAcquire(Mutex* mu, unsigned flags, bool (*real)(Mutex*)) {
  __tsan_mutex_pre_lock(mu, flags | __tsan_mutex_try_lock);
  bool locked = real(mu);
  unsigned result = locked ? 0 : __tsan_mutex_try_lock_failed;
  __tsan_mutex_post_lock(mu, flags | __tsan_mutex_try_lock | result, 0);
  return locked;
}

void Release(Mutex* mu, unsigned flags, void (*real)(Mutex*)) {
  __tsan_mutex_pre_unlock(mu, flags);
  real(mu);
  __tsan_mutex_post_unlock(mu, flags);
}

// Notification: Notify() stores `notified_yet_` with release semantics and HasBeenNotified()
// (inline, so instrumented in our code) loads it with acquire; the store happens in abseil, where
// TSan cannot see it, so Notify() also announces a release on the same address. The layout
// mirror is checked against the real class's size.
struct NotificationLayout {
  Mutex mutex_;
  std::atomic<bool> notified_yet_;
};
static_assert(sizeof(NotificationLayout) == sizeof(Notification), "absl::Notification layout");

void* NotifiedFlag(const Notification* n) {
  return const_cast<char*>(reinterpret_cast<const char*>(n)) +
         offsetof(NotificationLayout, notified_yet_);
}

// The *WithTimeout functions are their *WithDeadline twins from now, as in abseil (whose own
// *WithTimeout functions call the *WithDeadline ones through the PLT, which would annotate twice).
Time DeadlineFromTimeout(Duration timeout) { return absl::Now() + timeout; }

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  REAL(void (*)(Mutex*), "_ZN", "5Mutex4LockEv");
  Acquire(this, 0, [&] { return (real(this), 0); });
}

void Mutex::ReaderLock() {
  REAL(void (*)(Mutex*), "_ZN", "5Mutex10ReaderLockEv");
  Acquire(this, __tsan_mutex_read_lock, [&] { return (real(this), 0); });
}

bool Mutex::TryLock() {
  REAL(bool (*)(Mutex*), "_ZN", "5Mutex7TryLockEv");
  return TryAcquire(this, 0, real);
}

bool Mutex::ReaderTryLock() {
  REAL(bool (*)(Mutex*), "_ZN", "5Mutex13ReaderTryLockEv");
  return TryAcquire(this, __tsan_mutex_read_lock, real);
}

void Mutex::Unlock() {
  REAL(void (*)(Mutex*), "_ZN", "5Mutex6UnlockEv");
  Release(this, 0, real);
}

void Mutex::ReaderUnlock() {
  REAL(void (*)(Mutex*), "_ZN", "5Mutex12ReaderUnlockEv");
  Release(this, __tsan_mutex_read_lock, real);
}

void Mutex::LockWhen(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&), "_ZN", "5Mutex8LockWhenERKNS0_9ConditionE");
  Acquire(this, 0, [&] { return (real(this, cond), 0); });
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&), "_ZN", "5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  Acquire(this, __tsan_mutex_read_lock, [&] { return (real(this, cond), 0); });
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  return LockWhenWithDeadline(cond, DeadlineFromTimeout(timeout));
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, Time), "_ZN",
       "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return Acquire(this, 0, [&] { return real(this, cond, deadline); });
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, Duration timeout) {
  return ReaderLockWhenWithDeadline(cond, DeadlineFromTimeout(timeout));
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, Time), "_ZN",
       "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return Acquire(this, __tsan_mutex_read_lock, [&] { return real(this, cond, deadline); });
}

void Mutex::Await(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&), "_ZN", "5Mutex5AwaitERKNS0_9ConditionE");
  ReleaseAndReacquire(this, [&] { return (real(this, cond), 0); });
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  return AwaitWithDeadline(cond, DeadlineFromTimeout(timeout));
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, Time), "_ZN",
       "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return ReleaseAndReacquire(this, [&] { return real(this, cond, deadline); });
}

void CondVar::Wait(Mutex* mu) {
  REAL(void (*)(CondVar*, Mutex*), "_ZN", "7CondVar4WaitEPNS0_5MutexE");
  ReleaseAndReacquire(mu, [&] { return (real(this, mu), 0); });
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  return WaitWithDeadline(mu, DeadlineFromTimeout(timeout));
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  REAL(bool (*)(CondVar*, Mutex*, Time), "_ZN",
       "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  return ReleaseAndReacquire(mu, [&] { return real(this, mu, deadline); });
}

void Notification::Notify() {
  REAL(void (*)(Notification*), "_ZN", "12Notification6NotifyEv");
  __tsan_release(NotifiedFlag(this));
  real(this);
}

void Notification::WaitForNotification() const {
  REAL(void (*)(const Notification*), "_ZNK", "12Notification19WaitForNotificationEv");
  real(this);
  __tsan_acquire(NotifiedFlag(this));
}

bool Notification::WaitForNotificationWithTimeout(Duration timeout) const {
  return WaitForNotificationWithDeadline(DeadlineFromTimeout(timeout));
}

bool Notification::WaitForNotificationWithDeadline(Time deadline) const {
  REAL(bool (*)(const Notification*, Time), "_ZNK",
       "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  bool notified = real(this, deadline);
  if (notified) __tsan_acquire(NotifiedFlag(this));
  return notified;
}

ABSL_NAMESPACE_END
}  // namespace absl
