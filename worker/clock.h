// Clock: the time source of worker/ components, injectable so that time-dependent logic (the
// dynamic batcher's queue delay, request deadlines) can be tested with a fake clock and no sleeps.
#ifndef DMDSERVE_WORKER_CLOCK_H_
#define DMDSERVE_WORKER_CLOCK_H_

#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace dmdserve {

// Thread-safe. Implementations are never owned by the components that use them.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
  // Blocks with `mu` held until `cond` holds or Now() >= deadline; returns whether `cond` holds.
  // `mu` is released while waiting, as with absl::Mutex::AwaitWithDeadline.
  virtual bool AwaitWithDeadline(absl::Mutex* mu, const absl::Condition& cond,
                                 absl::Time deadline) = 0;
};

// The wall clock. Use RealClock::Get(); it lives for the whole process.
class RealClock final : public Clock {
 public:
  static RealClock* Get() {
    static RealClock* const clock = new RealClock();
    return clock;
  }
  absl::Time Now() const override { return absl::Now(); }
  bool AwaitWithDeadline(absl::Mutex* mu, const absl::Condition& cond,
                         absl::Time deadline) override {
    return mu->AwaitWithDeadline(cond, deadline);
  }
};

// A clock that moves only when told (tests). Waiters blocked in AwaitWithDeadline re-check their
// deadline whenever Advance() or SetTime() moves the clock.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::UnixEpoch()) : now_(start) {}

  absl::Time Now() const override {
    absl::MutexLock lock(&mu_);
    return now_;
  }

  void Advance(absl::Duration d) { SetTime(Now() + d); }

  void SetTime(absl::Time t) {
    std::vector<absl::Mutex*> waiters;
    {
      absl::MutexLock lock(&mu_);
      now_ = t;
      waiters = waiters_;
    }
    // Releasing a mutex makes absl re-evaluate the conditions of threads waiting on it.
    for (absl::Mutex* m : waiters) {
      m->Lock();
      m->Unlock();
    }
  }

  bool AwaitWithDeadline(absl::Mutex* mu, const absl::Condition& cond,
                         absl::Time deadline) override {
    {
      absl::MutexLock lock(&mu_);
      waiters_.push_back(mu);
    }
    struct Args {
      const FakeClock* clock;
      const absl::Condition* cond;
      absl::Time deadline;
    } args{this, &cond, deadline};
    mu->Await(absl::Condition(
        +[](Args* a) { return a->cond->Eval() || a->clock->Now() >= a->deadline; }, &args));
    {
      absl::MutexLock lock(&mu_);
      for (auto it = waiters_.begin(); it != waiters_.end(); ++it) {
        if (*it == mu) {
          waiters_.erase(it);
          break;
        }
      }
    }
    return cond.Eval();
  }

  // Number of threads currently blocked in AwaitWithDeadline (lets tests wait for a waiter).
  int num_waiters() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(waiters_.size());
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
  std::vector<absl::Mutex*> waiters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_CLOCK_H_
