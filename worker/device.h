// Devices: naming the libtorch devices dmdserve runs on, their memory, and how libtorch's errors
// say that memory ran out.
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

namespace dmdserve {

// True when this binary was built with CUDA support (DMDSERVE_WITH_CUDA).
bool CudaBuild();

// Number of CUDA devices libtorch sees; 0 in a CPU build or without a GPU.
int CudaDeviceCount();

// Turns a device list as given on the command line into canonical device names, one worker group
// each: "cpu", "cuda:N"; "cuda" and a bare index "N" mean "cuda:N" (index 0 for "cuda"); "all"
// (alone) means every visible CUDA device. Errors: INVALID_ARGUMENT for an empty list, an
// unknown name, a duplicate or "all" mixed with others; FAILED_PRECONDITION for "all" without
// CUDA. Whether a named cuda:N exists is checked when a pipeline is created on it.
absl::StatusOr<std::vector<std::string>> ResolveDevices(const std::vector<std::string>& devices);

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
