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

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace dmdserve {
#if DMDSERVE_WITH_CUDA
namespace {

// The CUDA device `name` names ("cuda:N"), if it names one.
std::optional<c10::Device> CudaDevice(const std::string& name) {
  try {
    const c10::Device device(name);
    if (device.is_cuda()) return device;
  } catch (const c10::Error&) {
  }
  return std::nullopt;
}

}  // namespace
#endif

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

absl::StatusOr<std::vector<std::string>> ResolveDevices(const std::vector<std::string>& devices) {
  if (devices.empty()) {
    return absl::InvalidArgumentError(
        "devices: at least one device is needed (\"cpu\", \"cuda:N\", \"N\" or \"all\")");
  }
  std::vector<std::string> resolved;
  for (const std::string& given : devices) {
    const std::string name = absl::AsciiStrToLower(absl::StripAsciiWhitespace(given));
    if (name == "all") {
      if (devices.size() != 1) {
        return absl::InvalidArgumentError("devices: \"all\" must be the only entry");
      }
      const int count = CudaDeviceCount();
      if (count == 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "devices: \"all\" needs CUDA devices and none is visible (",
            CudaBuild() ? "no GPU, or CUDA_VISIBLE_DEVICES hides them" : "this is a CPU build",
            ")"));
      }
      for (int i = 0; i < count; ++i) resolved.push_back(absl::StrCat("cuda:", i));
      return resolved;
    }
    int index = -1;
    std::string canonical;
    if (name == "cpu") {
      canonical = "cpu";
    } else if (name == "cuda") {
      canonical = "cuda:0";
    } else if ((absl::SimpleAtoi(name, &index) ||
                (absl::StartsWith(name, "cuda:") &&
                 absl::SimpleAtoi(absl::string_view(name).substr(5), &index))) &&
               index >= 0) {
      canonical = absl::StrCat("cuda:", index);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "devices: \"", given, "\" is not a device (\"cpu\", \"cuda:N\", \"N\" or \"all\")"));
    }
    if (std::find(resolved.begin(), resolved.end(), canonical) != resolved.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("devices: \"", canonical, "\" is listed twice"));
    }
    resolved.push_back(canonical);
  }
  return resolved;
}

absl::StatusOr<DeviceMemory> QueryDeviceMemory(const std::string& device) {
#if DMDSERVE_WITH_CUDA
  if (const std::optional<c10::Device> cuda = CudaDevice(device); cuda.has_value()) {
    try {
      const c10::cuda::CUDAGuard guard(cuda->has_index() ? cuda->index() : 0);
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
  const std::optional<c10::Device> cuda = CudaDevice(device);
  if (!cuda.has_value()) return;
  try {
    const c10::cuda::CUDAGuard guard(cuda->has_index() ? cuda->index() : 0);
    c10::cuda::CUDACachingAllocator::emptyCache();
  } catch (const std::exception&) {
    // Nothing else to release; the caller reports the original error.
  }
#endif
}

}  // namespace dmdserve
