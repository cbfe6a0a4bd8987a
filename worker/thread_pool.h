// ThreadPool: a fixed number of threads running scheduled closures in FIFO order.
//
// Used for PNG encoding so that image encoding never runs on (and never stalls) a model worker.
// Thread-safe. The destructor runs every closure already scheduled, then joins the threads.
#ifndef DMDSERVE_WORKER_THREAD_POOL_H_
#define DMDSERVE_WORKER_THREAD_POOL_H_

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace dmdserve {

class ThreadPool {
 public:
  struct Options {
    // Number of threads; must be >= 1. Default 2.
    int num_threads = 2;
  };

  static absl::StatusOr<std::unique_ptr<ThreadPool>> Create(const Options& options);

  // Drains: every closure scheduled before destruction runs, then the threads are joined.
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Queues `fn` to run on a pool thread. Never blocks. `fn` must not throw.
  void Schedule(std::function<void()> fn);

 private:
  explicit ThreadPool(int num_threads);
  void Loop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_THREAD_POOL_H_
