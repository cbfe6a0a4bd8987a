#include "worker/device.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmdserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(IsOutOfMemoryErrorTest, RecognisesAllocationFailures) {
  // Messages as libtorch and the CUDA libraries word them, alone and wrapped by TorchScript's
  // interpreter (which rethrows a module's error as a runtime error embedding its message).
  for (const char* message : {
           "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 "
           "GiB of which 3.06 GiB is free.",
           "The following operation failed in the TorchScript interpreter.\n"
           "Traceback of TorchScript (most recent call last):\n"
           "  File \"code/__torch__.py\", line 9, in forward\n"
           "RuntimeError: CUDA out of memory. Tried to allocate 2.00 MiB",
           "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
           "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
           "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
           "[enforce fail at alloc_cpu.cpp:75] err == 0. DefaultCPUAllocator: can't allocate "
           "memory: you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate "
           "memory)",
           "std::bad_alloc",
       }) {
    EXPECT_TRUE(IsOutOfMemoryError(message)) << message;
  }
}

TEST(IsOutOfMemoryErrorTest, OtherErrorsAreNot) {
  for (const char* message : {
           "index out of range in self",
           "Expected all tensors to be on the same device, but found at least two devices",
           "CUDA error: an illegal memory access was encountered",
           "The following operation failed in the TorchScript interpreter.\n"
           "RuntimeError: injected text encoder failure",
           "",
       }) {
    EXPECT_FALSE(IsOutOfMemoryError(message)) << message;
  }
}

TEST(ParseDeviceTest, ReadsEverySpellingOfCpuAndCuda) {
  struct Case {
    std::string name;
    bool cuda;
    int index;
    std::string canonical;
  };
  for (const Case& c : std::vector<Case>{{"cpu", false, 0, "cpu"},
                                         {" CPU ", false, 0, "cpu"},
                                         {"cuda", true, 0, "cuda:0"},
                                         {"cuda:3", true, 3, "cuda:3"},
                                         {"Cuda:12", true, 12, "cuda:12"},
                                         {"2", true, 2, "cuda:2"}}) {
    absl::StatusOr<DeviceId> device = ParseDevice(c.name);
    ASSERT_TRUE(device.ok()) << c.name << ": " << device.status();
    EXPECT_EQ(device->cuda, c.cuda) << c.name;
    EXPECT_EQ(device->index, c.index) << c.name;
    EXPECT_EQ(device->name(), c.canonical) << c.name;
  }
}

TEST(ParseDeviceTest, RejectsOtherNamesQuotingThem) {
  struct Case {
    std::string name;
    std::string message;
  };
  for (const Case& c : std::vector<Case>{
           {"gpu0", "\"gpu0\" is not a libtorch device"},
           {"cuda:-1", "\"cuda:-1\" is not a libtorch device"},
           {"", "\"\" is not a libtorch device"},
           {"all", "\"all\" is not a libtorch device"},
           {"meta", "\"meta\" is not supported (only cpu and cuda)"},
       }) {
    const absl::Status status = ParseDevice(c.name).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(status.message(), HasSubstr(c.message));
  }
}

TEST(ResolveDevicesTest, GivesCanonicalNames) {
  absl::StatusOr<std::vector<std::string>> devices = ResolveDevices({"cpu"});
  ASSERT_TRUE(devices.ok()) << devices.status();
  EXPECT_THAT(*devices, ElementsAre("cpu"));

  devices = ResolveDevices({"cuda", "1", "cuda:2", " CUDA:3 "});
  ASSERT_TRUE(devices.ok()) << devices.status();
  EXPECT_THAT(*devices, ElementsAre("cuda:0", "cuda:1", "cuda:2", "cuda:3"));
}

TEST(ResolveDevicesTest, RejectsBadListsNamingTheEntry) {
  struct Case {
    std::vector<std::string> devices;
    std::string message;
  };
  for (const Case& c : std::vector<Case>{
           {{}, "at least one device"},
           {{"gpu"}, "\"gpu\" is not a device"},
           {{"cuda:-1"}, "\"cuda:-1\" is not a device"},
           {{"0", "cuda:0"}, "\"cuda:0\" is listed twice"},
           {{"all", "cpu"}, "\"all\" must be the only entry"},
       }) {
    const absl::Status status = ResolveDevices(c.devices).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(status.message(), HasSubstr(c.message));
  }
}

TEST(ResolveDevicesTest, AllIsEveryVisibleCudaDevice) {
  absl::StatusOr<std::vector<std::string>> devices = ResolveDevices({"all"});
  const int count = CudaDeviceCount();
  if (count == 0) {
    EXPECT_EQ(devices.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(devices.status().message(), HasSubstr("\"all\" needs CUDA devices"));
    return;
  }
  ASSERT_TRUE(devices.ok()) << devices.status();
  ASSERT_EQ(devices->size(), static_cast<size_t>(count));
  EXPECT_EQ(devices->front(), "cuda:0");
  EXPECT_EQ(devices->back(), "cuda:" + std::to_string(count - 1));
}

TEST(DeviceBusyTimeTest, CountsOverlappingBatchesOnce) {
  const absl::Time t0 = absl::UnixEpoch();
  DeviceBusyTime busy;
  busy.BatchStarted(t0);
  busy.BatchStarted(t0 + absl::Seconds(1));
  EXPECT_EQ(busy.BatchFinished(t0 + absl::Seconds(3)), absl::Seconds(3));
  // Busy time already returned is not returned again; the running batch counts up to `now`.
  EXPECT_EQ(busy.BatchFinished(t0 + absl::Seconds(4)), absl::Seconds(1));
  // Idle time does not count.
  busy.BatchStarted(t0 + absl::Seconds(10));
  EXPECT_EQ(busy.BatchFinished(t0 + absl::Seconds(12)), absl::Seconds(2));
}

TEST(QueryDeviceMemoryTest, CpuMemoryIsNotTracked) {
  const absl::Status status = QueryDeviceMemory("cpu").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("\"cpu\" is not tracked"));
}

}  // namespace
}  // namespace dmdserve
