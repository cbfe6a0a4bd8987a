#include "worker/malloc_tuning.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;

// Where the blocks escape to, so that the compiler cannot elide their malloc/free pairs.
void* volatile escaped = nullptr;

// Number of blocks glibc currently serves with their own mmap, while a fresh `bytes`-byte block
// is held.
size_t MmappedBlocksWhileHolding(size_t bytes) {
  void* block = std::malloc(bytes);
  std::memset(block, 1, bytes);  // touch it, as a real activation is
  escaped = block;
  const size_t blocks = mallinfo2().hblks;
  std::free(escaped);
  return blocks;
}

// One test, in this order, because the settings are process-wide and cannot be undone (CTest
// runs each test in a process of its own).
TEST(MallocTuningTest, ActivationSizedBlocksStayOnTheHeapOnceTuned) {
  if (!MallocTuningApplies()) GTEST_SKIP() << "a sanitizer build: malloc is not glibc's";
  // glibc's default: an 8 MiB block gets its own mmap. Freeing it raises glibc's dynamic
  // thresholds to about 8 MiB (mmap) and 16 MiB (trim), which is all it learns by itself.
  const size_t before = mallinfo2().hblks;
  EXPECT_EQ(MmappedBlocksWhileHolding(size_t{8} << 20), before + 1);

  ASSERT_TRUE(ApplyMallocTuning({}).ok());
  // A 24 MiB batch of activations is above what glibc learned: tuned, it comes from the heap...
  constexpr size_t kActivation = size_t{24} << 20;
  EXPECT_EQ(MmappedBlocksWhileHolding(kActivation), before);
  // ...and stays there once freed, for the next batch (under the 256 MiB trim threshold).
  EXPECT_GE(mallinfo2().keepcost, kActivation);
}

TEST(MallocTuningTest, ValuesMalloptCannotTakeNameTheSetting) {
  absl::Status s = ApplyMallocTuning({.mmap_threshold_bytes = size_t{1} << 31});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("mmap_threshold_bytes"));
  s = ApplyMallocTuning({.trim_threshold_bytes = size_t{1} << 40});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("trim_threshold_bytes"));
}

}  // namespace
}  // namespace dmdserve
