// Devices: naming the libtorch devices dmdserve runs on, their busy time and memory, and how
// libtorch's errors say that memory ran out.
//
// CUDA support is a build option (CMake -DDMDSERVE_CUDA=ON against a CUDA libtorch, which defines
// DMDSERVE_WITH_CUDA=1); the CPU build compiles every CUDA path away, and these functions then
// answer as a machine without GPUs would. See docs/GPU.md.
//
// Thread safety: every function is thread-safe. No exception leaves them.
#ifndef DMDSERVE_WORKER_DEVICE_H_
#define DMDSERVE_WORKER_DEVICE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace dmdserve {

// True when this binary was built with CUDA support (DMDSERVE_WITH_CUDA).
bool CudaBuild();

// Number of CUDA devices libtorch sees; 0 in a CPU build or without a GPU.
int CudaDeviceCount();

// A device dmdserve runs on: the CPU or one CUDA device. A value type.
struct DeviceId {
  bool cuda = false;  // false: the CPU
  int index = 0;      // the CUDA device's index (>= 0); 0 for the CPU

  // The canonical name: "cpu" or "cuda:N".
  std::string name() const;
};

// The one parser of device names in worker/: "cpu", "cuda" (= "cuda:0"), "cuda:N" or a bare
// index "N" (= "cuda:N"), in any letter case, surrounding whitespace ignored. Whether cuda:N
// exists is not checked (see CudaDeviceCount). INVALID_ARGUMENT otherwise, quoting `name`:
// '"meta" is not supported (only cpu and cuda)' for another libtorch device type, '"gpu0" is not
// a libtorch device ("cpu", "cuda:N")' for the rest.
absl::StatusOr<DeviceId> ParseDevice(absl::string_view name);

// Turns a device list (Engine::Options::devices) into canonical device names, one worker group
// each: every entry as ParseDevice reads it, or "all" (alone): every visible CUDA device.
// Errors: INVALID_ARGUMENT for an empty list, an unknown name, a duplicate or "all" mixed with
// others; FAILED_PRECONDITION for "all" without CUDA. Whether a named cuda:N exists is checked
// when a pipeline is created on it.
absl::StatusOr<std::vector<std::string>> ResolveDevices(const std::vector<std::string>& devices);

// Busy-time accounting of one device that several workers run batches on: the device is busy
// while at least one batch runs on it, so its busy time is the union of the batches' run times,
// not their sum. Thread-safe.
class DeviceBusyTime {
 public:
  // A batch started on the device at `now`.
  void BatchStarted(absl::Time now);
  // A batch finished at `now`. Returns the busy time not returned before (including that of
  // batches still running, up to `now`).
  absl::Duration BatchFinished(absl::Time now);

 private:
  absl::Mutex mu_;
  int running_ ABSL_GUARDED_BY(mu_) = 0;            // batches running now
  absl::Time since_ ABSL_GUARDED_BY(mu_);           // when `running_` last changed
  absl::Duration unreported_ ABSL_GUARDED_BY(mu_);  // busy time not returned yet
};

// Device-wide memory of a CUDA device, all processes counted (what nvidia-smi shows).
struct DeviceMemory {
  int64_t used_bytes = 0;
  int64_t total_bytes = 0;
};

// Memory of `device` ("cuda:N"). FAILED_PRECONDITION for "cpu" (memory is not tracked there) and
// in a CPU build; INTERNAL when the CUDA runtime fails.
absl::StatusOr<DeviceMemory> QueryDeviceMemory(const std::string& device);

// True when a libtorch error message says an allocation failed for lack of memory: the CUDA
// caching allocator ("CUDA out of memory. Tried to allocate ..."), the CUDA runtime ("CUDA
// error: out of memory"), cuBLAS/cuDNN allocation failures, the CPU allocator ("can't allocate
// memory") and std::bad_alloc. TorchScript rethrows errors from inside a module as a plain
// runtime error whose message embeds the original one, so the message is what is classified.
bool IsOutOfMemoryError(absl::string_view message);

// Returns the memory libtorch's CUDA caching allocator holds but does not use on `device` to
// the driver, after an out-of-memory error. No-op for "cpu" and in a CPU build.
void ReleaseCachedMemory(const std::string& device);

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_DEVICE_H_
