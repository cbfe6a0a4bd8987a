// Tests that need a CUDA device: CTest label `gpu`, run with `ctest -L gpu` on a GPU machine
// (docs/GPU.md). Every test skips itself (GTEST_SKIP) where there is none: in a CPU build, or with
// no GPU visible. The bundle is models/tiny-random, whose random weights make real compute.
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "worker/device.h"
#include "worker/engine.h"
#include "worker/model_manifest.h"
#include "worker/pipeline.h"
#include "worker/postprocess.h"
#include "worker/test_util.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;

const std::string kTinyBundle = std::string(DMDSERVE_SOURCE_DIR) + "/models/tiny-random";

// Skips the test unless this build has CUDA paths and a CUDA device is visible.
#define SKIP_WITHOUT_CUDA()                                                      \
  if (!CudaBuild() || CudaDeviceCount() == 0) {                                  \
    GTEST_SKIP() << "needs a CUDA build (-DDMDSERVE_CUDA=ON) and a visible GPU"; \
  }

ModelManifest TinyManifest() {
  absl::StatusOr<ModelManifest> manifest = ModelManifest::Load(kTinyBundle);
  EXPECT_TRUE(manifest.ok()) << manifest.status();
  return manifest.value_or(ModelManifest());
}

std::unique_ptr<Pipeline> MakePipeline(const ModelManifest& manifest, Pipeline::Options options) {
  absl::StatusOr<std::unique_ptr<Pipeline>> pipeline = Pipeline::Create(manifest, options);
  EXPECT_TRUE(pipeline.ok()) << pipeline.status();
  return pipeline.ok() ? *std::move(pipeline) : nullptr;
}

// `n` images with distinct prompts (token ids < 4096: the tiny text encoder's hashed vocabulary).
std::vector<Pipeline::Input> Batch(const ModelManifest& manifest, int n, uint64_t seed) {
  std::vector<Pipeline::Input> batch(n);
  for (int i = 0; i < n; ++i) {
    batch[i].input_ids.assign(manifest.tokenizer.max_length, 49407);
    batch[i].input_ids[0] = 49406;
    batch[i].input_ids[1] = 320 + 7 * i;
    batch[i].seed = seed + i;
  }
  return batch;
}

Pipeline::Output RunOk(const Pipeline& pipeline, const std::vector<Pipeline::Input>& batch) {
  const ModelManifest& m = pipeline.manifest();
  absl::StatusOr<Pipeline::Output> output = pipeline.Run(batch, m.width, m.height);
  EXPECT_TRUE(output.ok()) << output.status();
  return output.ok() ? *std::move(output) : Pipeline::Output();
}

// Largest difference in levels between two images.
int MaxDiff(const std::string& a, const std::string& b) {
  EXPECT_EQ(a.size(), b.size());
  int diff = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<uint8_t>(a[i]) - static_cast<uint8_t>(b[i])));
  }
  return diff;
}

TEST(GpuTest, PostprocessKernelMatchesTorchOpsExactly) {
  SKIP_WITHOUT_CUDA();
#if DMDSERVE_WITH_CUDA
  for (const at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    // Odd sizes; values spanning and exceeding [-1, 1], fresh for each dtype.
    const at::Tensor images =
        (at::rand({3, 3, 37, 53}, at::TensorOptions(at::kFloat).device(at::kCUDA)) * 2.6 - 1.3)
            .to(dtype);
    const at::Tensor kernel = ToUint8NhwcCuda(images);
    const at::Tensor ops = ToUint8NhwcTorch(images);
    ASSERT_EQ(kernel.sizes(), ops.sizes()) << dtype;
    EXPECT_TRUE(at::equal(kernel, ops))
        << dtype << ": " << (kernel != ops).sum().item<int64_t>() << " differ";
  }
#endif
}

TEST(GpuTest, CudaImagesMatchCpuImages) {
  SKIP_WITHOUT_CUDA();
  // TF32 convolutions (libtorch's default on GPUs) would differ from the CPU by more than
  // summation order: compare in full float32.
  const bool tf32 = at::globalContext().allowTF32CuDNN();
  at::globalContext().setAllowTF32CuDNN(false);
  const ModelManifest manifest = TinyManifest();
  std::unique_ptr<Pipeline> cpu = MakePipeline(manifest, {});
  std::unique_ptr<Pipeline> cuda = MakePipeline(manifest, {.device = "cuda:0"});
  ASSERT_NE(cpu, nullptr);
  ASSERT_NE(cuda, nullptr);
  EXPECT_EQ(cuda->device(), "cuda:0");
  const std::vector<Pipeline::Input> batch = Batch(manifest, 4, 100);
  const Pipeline::Output on_cpu = RunOk(*cpu, batch);
  const Pipeline::Output on_cuda = RunOk(*cuda, batch);
  ASSERT_EQ(on_cuda.images.size(), 4u);
  for (size_t i = 0; i < on_cuda.images.size(); ++i) {
    const int diff = MaxDiff(on_cpu.images[i], on_cuda.images[i]);
    std::cout << "[ diff     ] cpu vs cuda, image " << i << ": max " << diff << " level(s)\n";
    EXPECT_LE(diff, 2) << "image " << i;
  }
  at::globalContext().setAllowTF32CuDNN(tf32);
}

TEST(GpuTest, GraphReplaysMatchEagerRunsAndPadToTheNextBatchSize) {
  SKIP_WITHOUT_CUDA();
  const ModelManifest manifest = TinyManifest();
  std::unique_ptr<Pipeline> eager = MakePipeline(manifest, {.device = "cuda:0"});
  std::unique_ptr<Pipeline> graphs =
      MakePipeline(manifest, {.device = "cuda:0", .cuda_graphs = true});
  ASSERT_NE(eager, nullptr);
  ASSERT_NE(graphs, nullptr);
  ASSERT_TRUE(graphs->Warmup().ok());
  absl::StatusOr<int> captured = graphs->CaptureGraphs();
  ASSERT_TRUE(captured.ok()) << captured.status();
  EXPECT_EQ(*captured,
            static_cast<int>(manifest.supported_sizes.size() * manifest.batch_sizes.size()));
  for (const int n : {1, 3, 8}) {
    const std::vector<Pipeline::Input> batch = Batch(manifest, n, 7 * n);
    const Pipeline::Output replayed = RunOk(*graphs, batch);
    const Pipeline::Output expected = RunOk(*eager, batch);
    EXPECT_TRUE(replayed.cuda_graph);
    EXPECT_FALSE(expected.cuda_graph);
    EXPECT_EQ(replayed.run_batch_size, n == 3 ? 4 : n);  // batch sizes 1, 2, 4, 8
    ASSERT_EQ(replayed.images.size(), static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      EXPECT_LE(MaxDiff(expected.images[i], replayed.images[i]), 1) << "batch " << n << " #" << i;
    }
  }
}

TEST(GpuTest, InstancesRunConcurrentlyAndGiveTheSerialResults) {
  SKIP_WITHOUT_CUDA();
  const ModelManifest manifest = TinyManifest();
  std::unique_ptr<Pipeline> pipeline =
      MakePipeline(manifest, {.device = "cuda:0", .instances = 2, .cuda_graphs = true});
  ASSERT_NE(pipeline, nullptr);
  ASSERT_TRUE(pipeline->Warmup().ok());
  ASSERT_TRUE(pipeline->CaptureGraphs().ok());
  std::vector<std::vector<Pipeline::Input>> batches;
  for (int b = 0; b < 16; ++b) batches.push_back(Batch(manifest, 1 + b % 8, 1000 * b));
  std::vector<std::vector<std::string>> serial;
  for (const auto& batch : batches) serial.push_back(RunOk(*pipeline, batch).images);
  std::vector<std::vector<std::string>> concurrent(batches.size());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (size_t b = t; b < batches.size(); b += 4) {
        concurrent[b] = RunOk(*pipeline, batches[b]).images;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (size_t b = 0; b < batches.size(); ++b) {
    ASSERT_EQ(concurrent[b].size(), serial[b].size()) << "batch " << b;
    for (size_t i = 0; i < serial[b].size(); ++i) {
      EXPECT_LE(MaxDiff(serial[b][i], concurrent[b][i]), 1) << "batch " << b << " #" << i;
    }
  }
}

TEST(GpuTest, PostprocessKernelPipelineMakesTheSameImages) {
  SKIP_WITHOUT_CUDA();
  const ModelManifest manifest = TinyManifest();
  std::unique_ptr<Pipeline> ops = MakePipeline(manifest, {.device = "cuda:0"});
  std::unique_ptr<Pipeline> kernel = MakePipeline(
      manifest, {.device = "cuda:0", .postprocess = Pipeline::Postprocess::kCudaKernel});
  ASSERT_NE(ops, nullptr);
  ASSERT_NE(kernel, nullptr);
  const std::vector<Pipeline::Input> batch = Batch(manifest, 4, 5);
  EXPECT_EQ(RunOk(*kernel, batch).images, RunOk(*ops, batch).images);
}

TEST(GpuTest, HalfPrecisionComponentsRun) {
  SKIP_WITHOUT_CUDA();
  for (const char* dtype : {"float16", "bfloat16", "generator=float16,decoder=float32"}) {
    ModelManifest manifest = TinyManifest();
    ASSERT_TRUE(ApplyDTypeOverride(dtype, manifest.dtypes).ok());
    std::unique_ptr<Pipeline> pipeline =
        MakePipeline(manifest, {.device = "cuda:0", .cuda_graphs = true});
    ASSERT_NE(pipeline, nullptr) << dtype;
    ASSERT_TRUE(pipeline->Warmup().ok()) << dtype;
    ASSERT_TRUE(pipeline->CaptureGraphs().ok()) << dtype;
    EXPECT_EQ(RunOk(*pipeline, Batch(manifest, 2, 9)).images.size(), 2u) << dtype;
  }
}

// A batch far too large for the GPU fails with RESOURCE_EXHAUSTED, the cached memory goes back
// to the driver, and the pipeline keeps working.
TEST(GpuTest, HugeBatchRunsOutOfMemoryAndThePipelineRecovers) {
  SKIP_WITHOUT_CUDA();
  // The tiny bundle at 4096x4096 in batches of 64: its decoder alone needs over 200 GB.
  const std::string dir = testing::MakeTempDir();
  std::filesystem::copy(kTinyBundle, dir, std::filesystem::copy_options::recursive);
  nlohmann::json json = nlohmann::json::parse(testing::ReadFile(dir + "/model.json"));
  json["image"]["supported_sizes"] = {{32, 32}, {4096, 4096}};
  json["batch_sizes"] = {1, 64};
  std::ofstream(dir + "/model.json") << json.dump(2);
  absl::StatusOr<ModelManifest> manifest = ModelManifest::Load(dir);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  std::unique_ptr<Pipeline> pipeline = MakePipeline(*manifest, {.device = "cuda:0"});
  ASSERT_NE(pipeline, nullptr);

  absl::StatusOr<Pipeline::Output> huge = pipeline->Run(Batch(*manifest, 64, 1), 4096, 4096);
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
  EXPECT_THAT(huge.status().message(), HasSubstr("ran out of memory on cuda:0"));
  absl::StatusOr<DeviceMemory> memory = QueryDeviceMemory("cuda:0");
  ASSERT_TRUE(memory.ok()) << memory.status();
  EXPECT_LT(memory->used_bytes, memory->total_bytes / 2) << "the cache was not emptied";

  absl::StatusOr<Pipeline::Output> small = pipeline->Run(Batch(*manifest, 1, 2), 32, 32);
  EXPECT_TRUE(small.ok()) << small.status();
}

// Collects DeviceStats events.
class DeviceStatsRecorder : public EngineListener {
 public:
  void OnDeviceStats(const DeviceStats& stats) override {
    absl::MutexLock lock(&mu_);
    devices_.emplace_back(stats.device);
    busy_ += stats.busy;
    memory_used_ = stats.memory_used_bytes;
    memory_total_ = stats.memory_total_bytes;
  }
  std::vector<std::string> devices() {
    absl::MutexLock lock(&mu_);
    return devices_;
  }
  absl::Duration busy() {
    absl::MutexLock lock(&mu_);
    return busy_;
  }
  std::pair<int64_t, int64_t> memory() {
    absl::MutexLock lock(&mu_);
    return {memory_used_, memory_total_};
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> devices_ ABSL_GUARDED_BY(mu_);
  absl::Duration busy_ ABSL_GUARDED_BY(mu_);
  int64_t memory_used_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t memory_total_ ABSL_GUARDED_BY(mu_) = 0;
};

TEST(GpuTest, EngineServesFromEveryGpuWithGraphsAndReportsDeviceStats) {
  SKIP_WITHOUT_CUDA();
  DeviceStatsRecorder recorder;  // before the engine: it must outlive it (Shutdown still reports)
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Create({.model_dirs = {kTinyBundle}, .devices = {"all"}, .instances_per_device = 2});
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->Devices().size(), static_cast<size_t>(CudaDeviceCount()));
  (*engine)->SetListener(&recorder);
  ASSERT_TRUE((*engine)->Warmup().ok());

  constexpr int kRequests = 32;
  absl::Mutex mu;
  int ok = 0;
  int done = 0;
  for (int r = 0; r < kRequests; ++r) {
    GenerateParams params;
    params.prompt = absl::StrCat("a photo of item ", r);
    params.num_images = 1 + r % 4;
    params.seed = r;
    GenerateCallbacks callbacks;
    callbacks.on_done = [&, r](absl::Status status, GenerateResult result) {
      absl::MutexLock lock(&mu);
      ok += status.ok() && result.images.size() == static_cast<size_t>(1 + r % 4);
      ++done;
    };
    ASSERT_TRUE((*engine)->Submit(std::move(params), std::move(callbacks)).ok());
  }
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(
        +[](int* d) { return *d == kRequests; }, &done));
    EXPECT_EQ(ok, kRequests);
  }
  const std::vector<std::string> devices = recorder.devices();
  ASSERT_FALSE(devices.empty());
  for (const std::string& device : devices) EXPECT_THAT(device, HasSubstr("cuda:"));
  EXPECT_GT(recorder.busy(), absl::ZeroDuration());
  const auto [used, total] = recorder.memory();
  EXPECT_GT(used, 0);
  EXPECT_GE(total, used);
}

}  // namespace
}  // namespace dmdserve
