#include "worker/device.h"

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#if DMDSERVE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace dmdserve {
namespace {

// True when `name` is a libtorch device of a type other than the CPU and CUDA ("meta", "mps").
bool IsOtherTorchDevice(absl::string_view name) {
  try {
    const c10::Device device{std::string(name)};
    return !device.is_cpu() && !device.is_cuda();
  } catch (const std::exception&) {
    return false;
  }
}

#if DMDSERVE_WITH_CUDA
// The index of the CUDA device `name` names, if it names one.
std::optional<int> CudaIndex(absl::string_view name) {
  const absl::StatusOr<DeviceId> device = ParseDevice(name);
  if (!device.ok() || !device->cuda) return std::nullopt;
  return device->index;
}
#endif

// "all": every visible CUDA device; FAILED_PRECONDITION when there is none.
absl::StatusOr<std::vector<std::string>> AllCudaDevices() {
  const int count = CudaDeviceCount();
  if (count == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "devices: \"all\" needs CUDA devices and none is visible (",
        CudaBuild() ? "no GPU, or CUDA_VISIBLE_DEVICES hides them" : "this is a CPU build", ")"));
  }
  std::vector<std::string> all;
  for (int i = 0; i < count; ++i) all.push_back(DeviceId{.cuda = true, .index = i}.name());
  return all;
}

}  // namespace

bool CudaBuild() {
#if DMDSERVE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int CudaDeviceCount() {
  try {
    return torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
  } catch (const std::exception&) {
    return 0;
  }
}

std::string DeviceId::name() const { return cuda ? absl::StrCat("cuda:", index) : "cpu"; }

absl::StatusOr<DeviceId> ParseDevice(absl::string_view given) {
  const std::string name = absl::AsciiStrToLower(absl::StripAsciiWhitespace(given));
  if (name == "cpu") return DeviceId{};
  if (name == "cuda") return DeviceId{.cuda = true, .index = 0};
  int index = -1;
  if ((absl::SimpleAtoi(name, &index) ||
       (absl::StartsWith(name, "cuda:") &&
        absl::SimpleAtoi(absl::string_view(name).substr(5), &index))) &&
      index >= 0) {
    return DeviceId{.cuda = true, .index = index};
  }
  if (IsOtherTorchDevice(given)) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"", given, "\" is not supported (only cpu and cuda)"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("\"", given, "\" is not a libtorch device (\"cpu\", \"cuda:N\")"));
}

absl::StatusOr<std::vector<std::string>> ResolveDevices(const std::vector<std::string>& devices) {
  if (devices.empty()) {
    return absl::InvalidArgumentError(
        "devices: at least one device is needed (\"cpu\", \"cuda:N\", \"N\" or \"all\")");
  }
  std::vector<std::string> resolved;
  for (const std::string& given : devices) {
    if (absl::AsciiStrToLower(absl::StripAsciiWhitespace(given)) == "all") {
      if (devices.size() != 1) {
        return absl::InvalidArgumentError("devices: \"all\" must be the only entry");
      }
      return AllCudaDevices();
    }
    const absl::StatusOr<DeviceId> device = ParseDevice(given);
    if (!device.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "devices: \"", given, "\" is not a device (\"cpu\", \"cuda:N\", \"N\" or \"all\")"));
    }
    const std::string canonical = device->name();
    if (std::find(resolved.begin(), resolved.end(), canonical) != resolved.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("devices: \"", canonical, "\" is listed twice"));
    }
    resolved.push_back(canonical);
  }
  return resolved;
}

void DeviceBusyTime::BatchStarted(absl::Time now) {
  absl::MutexLock lock(&mu_);
  if (running_ > 0) unreported_ += now - since_;
  since_ = now;
  ++running_;
}

absl::Duration DeviceBusyTime::BatchFinished(absl::Time now) {
  absl::MutexLock lock(&mu_);
  unreported_ += now - since_;
  since_ = now;
  --running_;
  return std::exchange(unreported_, absl::ZeroDuration());
}

absl::StatusOr<DeviceMemory> QueryDeviceMemory(const std::string& device) {
#if DMDSERVE_WITH_CUDA
  if (const std::optional<int> index = CudaIndex(device); index.has_value()) {
    try {
      const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(*index));
      size_t free_bytes = 0;
      size_t total_bytes = 0;
      const cudaError_t error = cudaMemGetInfo(&free_bytes, &total_bytes);
      if (error != cudaSuccess) {
        (void)cudaGetLastError();  // clears the error, which is not sticky
        return absl::InternalError(
            absl::StrCat("cudaMemGetInfo on ", device, ": ", cudaGetErrorString(error)));
      }
      return DeviceMemory{static_cast<int64_t>(total_bytes - free_bytes),
                          static_cast<int64_t>(total_bytes)};
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("memory of ", device, ": ", e.what()));
    }
  }
#endif
  return absl::FailedPreconditionError(absl::StrCat(
      "memory of device \"", device, "\" is not tracked (only CUDA devices, in a CUDA build)"));
}

bool IsOutOfMemoryError(absl::string_view message) {
  const std::string lower = absl::AsciiStrToLower(message);
  for (const absl::string_view needle :
       {"out of memory", "can't allocate memory", "cublas_status_alloc_failed",
        "cudnn_status_alloc_failed", "std::bad_alloc"}) {
    if (absl::StrContains(lower, needle)) return true;
  }
  return false;
}

void ReleaseCachedMemory(const std::string& device) {
#if DMDSERVE_WITH_CUDA
  const std::optional<int> index = CudaIndex(device);
  if (!index.has_value()) return;
  try {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(*index));
    c10::cuda::CUDACachingAllocator::emptyCache();
  } catch (const std::exception&) {
    // Nothing else to release; the caller reports the original error.
  }
#endif
}

}  // namespace dmdserve
