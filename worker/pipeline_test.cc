#include "worker/pipeline.h"

#include <stdlib.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "worker/device.h"
#include "worker/test_util.h"

namespace dmdserve {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

namespace fs = std::filesystem;

using ::dmdserve::testing::BuiltBundle;
using ::dmdserve::testing::MakeTempDir;
using ::dmdserve::testing::ReadFile;
using ::dmdserve::testing::RunCommand;
using ::dmdserve::testing::SourcePath;

ModelManifest LoadManifest(const std::string& bundle) {
  absl::StatusOr<ModelManifest> manifest = ModelManifest::Load(bundle);
  EXPECT_TRUE(manifest.ok()) << manifest.status();
  return manifest.value_or(ModelManifest());
}

// input_ids as the CLIP tokenizer lays them out: BOS, `words`, EOS, pad up to max_length, with the
// special tokens' ids looked up in the bundle's vocab.json.
std::vector<int32_t> InputIds(const ModelManifest::Tokenizer& tokenizer,
                              const std::vector<int32_t>& words) {
  const json vocab = json::parse(ReadFile(tokenizer.vocab_path));
  std::vector<int32_t> ids = {vocab.at(tokenizer.bos_token).get<int32_t>()};
  ids.insert(ids.end(), words.begin(), words.end());
  ids.push_back(vocab.at(tokenizer.eos_token).get<int32_t>());
  ids.resize(tokenizer.max_length, vocab.at(tokenizer.pad_token).get<int32_t>());
  return ids;
}

std::vector<int32_t> InputIds(const ModelManifest& manifest, const std::vector<int32_t>& words) {
  return InputIds(manifest.tokenizer, words);
}

// One image's input: `words` laid out by the manifest's tokenizer (and its second one, if any).
Pipeline::Input MakeInput(const ModelManifest& manifest, const std::vector<int32_t>& words,
                          uint64_t seed) {
  Pipeline::Input input{InputIds(manifest, words), seed};
  if (manifest.tokenizer_2.has_value()) input.input_ids_2 = InputIds(*manifest.tokenizer_2, words);
  return input;
}

std::unique_ptr<Pipeline> MakePipeline(const ModelManifest& manifest,
                                       Pipeline::Options options = {}) {
  options.uncond_input_ids = InputIds(manifest, {});
  if (manifest.tokenizer_2.has_value()) {
    options.uncond_input_ids_2 = InputIds(*manifest.tokenizer_2, {});
  }
  absl::StatusOr<std::unique_ptr<Pipeline>> pipeline = Pipeline::Create(manifest, options);
  EXPECT_TRUE(pipeline.ok()) << pipeline.status();
  return pipeline.ok() ? *std::move(pipeline) : nullptr;
}

std::vector<std::string> RunOk(const Pipeline& pipeline, const std::vector<Pipeline::Input>& batch,
                               int width, int height) {
  absl::StatusOr<Pipeline::Output> output = pipeline.Run(batch, width, height);
  EXPECT_TRUE(output.ok()) << output.status();
  return output.ok() ? output->images : std::vector<std::string>();
}

// The images tools/reference_pipeline.py makes for `batch`.
std::vector<std::string> ReferenceImages(const std::string& bundle,
                                         const std::vector<Pipeline::Input>& batch, int width,
                                         int height, int channels) {
  json inputs = json::array();
  for (const Pipeline::Input& input : batch) {
    inputs.push_back({{"input_ids", input.input_ids}, {"seed", input.seed}});
    if (!input.input_ids_2.empty()) inputs.back()["input_ids_2"] = input.input_ids_2;
  }
  const std::string out = MakeTempDir() + "/images.u8";
  // The JSON holds only numbers, brackets, braces, quotes and commas: safe in single quotes.
  RunCommand(absl::StrCat(DMDSERVE_PYTHON, " ",
                          SourcePath("tools/reference_pipeline.py").string(), " --bundle ",
                          bundle, " --width ", width, " --height ", height, " --inputs-json '",
                          inputs.dump(), "' --out ", out));
  const std::string bytes = ReadFile(out);
  const size_t image_bytes = static_cast<size_t>(width) * height * channels;
  EXPECT_EQ(bytes.size(), image_bytes * batch.size());
  std::vector<std::string> images;
  for (size_t i = 0; i < batch.size() && (i + 1) * image_bytes <= bytes.size(); ++i) {
    images.push_back(bytes.substr(i * image_bytes, image_bytes));
  }
  return images;
}

size_t DifferingPixels(const std::string& a, const std::string& b) {
  size_t differing = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) differing += a[i] != b[i];
  return differing;
}

// Expects image `b` to equal image `a` within 1 intensity level, and prints how far apart they are
// (docs/BUNDLE.md quotes these "[ diff ]" lines).
void ExpectWithinOneLevel(const std::string& a, const std::string& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  int max_diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_diff =
        std::max(max_diff, std::abs(static_cast<uint8_t>(a[i]) - static_cast<uint8_t>(b[i])));
  }
  std::cout << "[ diff     ] " << what << ": max " << max_diff << " level(s), "
            << DifferingPixels(a, b) << " of " << a.size() << " pixels differ" << std::endl;
  EXPECT_LE(max_diff, 1) << what;
}

// Bundles under test: the committed one-step bundle, and few-step variants built at test time.
struct BundleCase {
  std::string name;
  std::string make_args;  // empty: models/tiny-random
};

void PrintTo(const BundleCase& c, std::ostream* os) { *os << c.name; }

std::string BundleDir(const BundleCase& c) {
  return c.make_args.empty() ? SourcePath("models/tiny-random").string() : BuiltBundle(c.make_args);
}

class PipelineBundleTest : public ::testing::TestWithParam<BundleCase> {
 protected:
  void SetUp() override {
    bundle_ = BundleDir(GetParam());
    manifest_ = LoadManifest(bundle_);
    pipeline_ = MakePipeline(manifest_);
    ASSERT_NE(pipeline_, nullptr);
    // Three prompts of made-up words (ids of real vocabulary entries).
    prompt_a_ = {320, 1125, 539};
    prompt_b_ = {2368, 530, 518, 3293, 268};
    prompt_c_ = {11760};
  }

  // The input of `words` with `seed`, from both tokenizers of a bundle that has two.
  Pipeline::Input In(const std::vector<int32_t>& words, uint64_t seed) const {
    return MakeInput(manifest_, words, seed);
  }

  std::string bundle_;
  ModelManifest manifest_;
  std::unique_ptr<Pipeline> pipeline_;
  std::vector<int32_t> prompt_a_, prompt_b_, prompt_c_;
};

TEST_P(PipelineBundleTest, MatchesPythonReference) {
  // A repeated prompt (A), the largest seed, and both supported sizes.
  const std::vector<Pipeline::Input> batch = {
      In(prompt_a_, 0), In(prompt_b_, 1), In(prompt_a_, 2), In(prompt_c_, 18446744073709551615ULL)};
  for (const ModelManifest::Size& size : manifest_.supported_sizes) {
    SCOPED_TRACE(absl::StrCat(size.width, "x", size.height));
    const std::vector<std::string> images = RunOk(*pipeline_, batch, size.width, size.height);
    const std::vector<std::string> reference =
        ReferenceImages(bundle_, batch, size.width, size.height, manifest_.channels);
    ASSERT_EQ(images.size(), batch.size());
    ASSERT_EQ(reference.size(), batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      EXPECT_EQ(images[i].size(),
                static_cast<size_t>(size.width) * size.height * manifest_.channels);
      ExpectWithinOneLevel(reference[i], images[i],
                           absl::StrCat("C++ vs Python reference, image ", i));
    }
  }
}

TEST_P(PipelineBundleTest, SameSeedSameImageAloneOrInABatch) {
  const std::vector<std::string> alone =
      RunOk(*pipeline_, {In(prompt_a_, 7)}, manifest_.width, manifest_.height);
  const std::vector<std::string> batch =
      RunOk(*pipeline_, {In(prompt_b_, 1), In(prompt_a_, 7), In(prompt_c_, 2), In(prompt_a_, 8)},
            manifest_.width, manifest_.height);
  ASSERT_EQ(alone.size(), 1u);
  ASSERT_EQ(batch.size(), 4u);
  ExpectWithinOneLevel(alone[0], batch[1], "alone vs position 1 of a batch of 4");
}

TEST_P(PipelineBundleTest, ImageDoesNotDependOnBatchPosition) {
  const std::vector<std::string> forward =
      RunOk(*pipeline_, {In(prompt_a_, 11), In(prompt_b_, 12)}, manifest_.width, manifest_.height);
  const std::vector<std::string> reversed =
      RunOk(*pipeline_, {In(prompt_b_, 12), In(prompt_a_, 11)}, manifest_.width, manifest_.height);
  ASSERT_EQ(forward.size(), 2u);
  ASSERT_EQ(reversed.size(), 2u);
  ExpectWithinOneLevel(forward[0], reversed[1], "batch position 0 vs 1");
  ExpectWithinOneLevel(forward[1], reversed[0], "batch position 1 vs 0");
}

TEST_P(PipelineBundleTest, DifferentSeedsOrPromptsGiveDifferentImages) {
  const std::vector<std::string> images =
      RunOk(*pipeline_, {In(prompt_a_, 1), In(prompt_a_, 2), In(prompt_b_, 1)}, manifest_.width,
            manifest_.height);
  ASSERT_EQ(images.size(), 3u);
  EXPECT_GT(DifferingPixels(images[0], images[1]), images[0].size() / 2) << "seeds 1 and 2";
  EXPECT_GT(DifferingPixels(images[0], images[2]), images[0].size() / 2) << "prompts A and B";
}

TEST_P(PipelineBundleTest, ConcurrentRunsGiveTheSerialResults) {
  // Two execution instances for four threads: runs proceed two at a time, the others wait.
  std::unique_ptr<Pipeline> pipeline = MakePipeline(manifest_, {.instances = 2});
  ASSERT_NE(pipeline, nullptr);
  std::vector<std::vector<Pipeline::Input>> batches;
  for (uint64_t seed = 0; seed < 8; ++seed) {
    batches.push_back({In(seed % 2 ? prompt_a_ : prompt_b_, seed), In(prompt_c_, seed + 100)});
  }
  std::vector<std::vector<std::string>> serial;
  for (const auto& batch : batches) {
    serial.push_back(RunOk(*pipeline, batch, manifest_.width, manifest_.height));
  }
  std::vector<std::vector<std::string>> concurrent(batches.size());
  std::vector<std::thread> threads;
  constexpr int kThreads = 4;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = t; i < batches.size(); i += kThreads) {
        concurrent[i] = RunOk(*pipeline, batches[i], manifest_.width, manifest_.height);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (size_t i = 0; i < batches.size(); ++i) {
    ASSERT_EQ(concurrent[i].size(), serial[i].size()) << "batch " << i;
    for (size_t j = 0; j < serial[i].size(); ++j) {
      ExpectWithinOneLevel(serial[i][j], concurrent[i][j],
                           absl::StrCat("serial vs concurrent, batch ", i, " image ", j));
    }
  }
}

TEST_P(PipelineBundleTest, WarmupSucceeds) { EXPECT_TRUE(pipeline_->Warmup().ok()); }

INSTANTIATE_TEST_SUITE_P(
    Bundles, PipelineBundleTest,
    ::testing::Values(BundleCase{"TinyRandom", ""},
                      BundleCase{"TwoStepRenoiseGuidance",
                                 "--steps 2 --step-mode renoise --guidance 3"},
                      BundleCase{"ThreeStepDdim", "--steps 3 --step-mode ddim"},
                      // dmdserve.bundle/v2, shaped like SDXL exports (DMD2 4-step: renoise and
                      // no guidance; SDXL-Lightning: ddim from a scaled start; the teacher: CFG
                      // with zero unconditional embeddings; CFG with the empty prompt).
                      BundleCase{"SdxlLikeRenoise", "--sdxl --steps 2 --step-mode renoise"},
                      BundleCase{"SdxlLikeScaledStartDdim",
                                 "--sdxl --steps 3 --step-mode ddim --initial-noise-scale 0.9"},
                      BundleCase{"SdxlLikeZeroUncondGuidance",
                                 "--sdxl --steps 2 --guidance 3 --unconditional zeros"},
                      BundleCase{"SdxlLikeEmptyPromptGuidance", "--sdxl --guidance 2"}),
    [](const ::testing::TestParamInfo<BundleCase>& info) { return info.param.name; });

class PipelineTest : public ::testing::Test {
 protected:
  const ModelManifest manifest_ = LoadManifest(SourcePath("models/tiny-random").string());
};

TEST_F(PipelineTest, RejectsBadInputs) {
  std::unique_ptr<Pipeline> pipeline = MakePipeline(manifest_);
  ASSERT_NE(pipeline, nullptr);
  const std::vector<int32_t> ids = InputIds(manifest_, {320});
  struct Case {
    std::vector<Pipeline::Input> batch;
    int width;
    int height;
    std::string message;
  };
  std::vector<int32_t> negative = ids;
  negative[5] = -3;
  const std::vector<Case> cases = {
      {{}, 32, 32, "empty batch"},
      {std::vector<Pipeline::Input>(9, {ids, 0}), 32, 32,
       "batch of 9 images exceeds model tiny-random's largest batch size 8"},
      {{{ids, 0}},
       48,
       48,
       "size 48x48 is not supported by model tiny-random (supported: 32x32, 64x32)"},
      {{{ids, 0}}, 32, 64, "size 32x64 is not supported"},
      {{{ids, 0}, {std::vector<int32_t>(76, 1), 0}},
       32,
       32,
       "batch[1].input_ids has 76 token ids, expected 77"},
      {{{negative, 0}}, 32, 32, "batch[0].input_ids[5] is -3"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<Pipeline::Output> output = pipeline->Run(c.batch, c.width, c.height);
    EXPECT_EQ(output.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(output.status().message(), HasSubstr(c.message));
  }
}

TEST_F(PipelineTest, CudaDeviceWithoutCudaFailsCleanly) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "CUDA is available here";
  Pipeline::Options options;
  options.device = "cuda:0";
  absl::StatusOr<std::unique_ptr<Pipeline>> pipeline = Pipeline::Create(manifest_, options);
  EXPECT_EQ(pipeline.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(pipeline.status().message(), HasSubstr("\"cuda:0\" needs CUDA"));
}

TEST_F(PipelineTest, RejectsBadOptions) {
  Pipeline::Options options;
  options.device = "gpu0";
  absl::StatusOr<std::unique_ptr<Pipeline>> pipeline = Pipeline::Create(manifest_, options);
  EXPECT_EQ(pipeline.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pipeline.status().message(), HasSubstr("\"gpu0\" is not a libtorch device"));

  options.device = "meta";
  pipeline = Pipeline::Create(manifest_, options);
  EXPECT_EQ(pipeline.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pipeline.status().message(), HasSubstr("only cpu and cuda"));

  options.device = "cpu";
  options.intra_op_threads = -1;
  pipeline = Pipeline::Create(manifest_, options);
  EXPECT_EQ(pipeline.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pipeline.status().message(), HasSubstr("intra_op_threads must be >= 0, got -1"));

  options.intra_op_threads = 0;
  options.instances = 0;
  pipeline = Pipeline::Create(manifest_, options);
  EXPECT_EQ(pipeline.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pipeline.status().message(), HasSubstr("instances must be >= 1, got 0"));

  // The CUDA kernel needs a CUDA build, and then a CUDA device.
  options.instances = 1;
  options.postprocess = Pipeline::Postprocess::kCudaKernel;
  pipeline = Pipeline::Create(manifest_, options);
  EXPECT_EQ(pipeline.status().code(), CudaBuild() ? absl::StatusCode::kInvalidArgument
                                                  : absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(pipeline.status().message(),
              HasSubstr(CudaBuild() ? "cuda_kernel needs a CUDA device, got cpu"
                                    : "cuda_kernel needs a CUDA build"));
}

TEST(PipelinePostprocessTest, ParsesTheTwoNames) {
  EXPECT_EQ(Pipeline::ParsePostprocess("torch").value(), Pipeline::Postprocess::kTorchOps);
  EXPECT_EQ(Pipeline::ParsePostprocess("cuda_kernel").value(), Pipeline::Postprocess::kCudaKernel);
  const absl::Status bad = Pipeline::ParsePostprocess("kernel").status();
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.message(), HasSubstr("\"kernel\" is neither"));
}

TEST_F(PipelineTest, EagerRunsReportTheirBatchAndStageTimes) {
  std::unique_ptr<Pipeline> pipeline = MakePipeline(manifest_);
  ASSERT_NE(pipeline, nullptr);
  EXPECT_EQ(pipeline->device(), "cpu");
  const std::vector<Pipeline::Input> batch = {{InputIds(manifest_, {320}), 1},
                                              {InputIds(manifest_, {321}), 2},
                                              {InputIds(manifest_, {322}), 3}};
  absl::StatusOr<Pipeline::Output> output = pipeline->Run(batch, 32, 32);
  ASSERT_TRUE(output.ok()) << output.status();
  EXPECT_EQ(output->run_batch_size, 3);  // no padding without CUDA graphs
  EXPECT_FALSE(output->cuda_graph);
  const Pipeline::Timings& t = output->timings;
  EXPECT_GT(t.generator, absl::ZeroDuration());
  EXPECT_GE(t.total, t.text_encoder + t.generator + t.decoder);  // the stages are parts of it
}

TEST_F(PipelineTest, CudaGraphsAreIgnoredOnTheCpu) {
  std::unique_ptr<Pipeline> pipeline = MakePipeline(manifest_, {.cuda_graphs = true});
  ASSERT_NE(pipeline, nullptr);
  ASSERT_TRUE(pipeline->Warmup().ok());
  absl::StatusOr<int> captured = pipeline->CaptureGraphs();
  ASSERT_TRUE(captured.ok()) << captured.status();
  EXPECT_EQ(*captured, 0);
  absl::StatusOr<Pipeline::Output> output =
      pipeline->Run({{InputIds(manifest_, {320}), 1}}, 32, 32);
  ASSERT_TRUE(output.ok()) << output.status();
  EXPECT_FALSE(output->cuda_graph);
}

// A real allocation failure inside a component (the fixture's text encoder asks for 1 PiB when it
// sees the trigger token) fails that batch with RESOURCE_EXHAUSTED; the next batch runs.
TEST_F(PipelineTest, OutOfMemoryIsResourceExhaustedAndThePipelineKeepsWorking) {
  constexpr int kTrigger = 11760;
  const std::string dir = MakeTempDir() + "/oom-bundle";
  ASSERT_TRUE(RunCommand(absl::StrCat(
      DMDSERVE_PYTHON, " ", SourcePath("tests/fixtures/make_faulty_bundle.py").string(),
      " --fault oom --src ", SourcePath("models/tiny-random").string(), " --out ", dir,
      " --trigger-id ", kTrigger)));
  std::unique_ptr<Pipeline> pipeline = MakePipeline(LoadManifest(dir));
  ASSERT_NE(pipeline, nullptr);
  absl::StatusOr<Pipeline::Output> output = pipeline->Run(
      {{InputIds(manifest_, {320}), 1}, {InputIds(manifest_, {kTrigger}), 2}}, 32, 32);
  EXPECT_EQ(output.status().code(), absl::StatusCode::kResourceExhausted) << output.status();
  EXPECT_THAT(output.status().message(),
              HasSubstr("model oom: text_encoder ran out of memory on cpu"));
  output = pipeline->Run({{InputIds(manifest_, {320}), 1}}, 32, 32);
  EXPECT_TRUE(output.ok()) << output.status();
}

TEST_F(PipelineTest, GuidanceNeedsTheEmptyPromptIds) {
  const ModelManifest manifest =
      LoadManifest(BuiltBundle("--steps 2 --step-mode renoise --guidance 3"));
  Pipeline::Options options;
  absl::StatusOr<std::unique_ptr<Pipeline>> pipeline = Pipeline::Create(manifest, options);
  EXPECT_EQ(pipeline.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pipeline.status().message(),
              HasSubstr("uncond_input_ids (needed because guidance_scale > 1) has 0 token ids"));
}

TEST_F(PipelineTest, BFloat16BundleMatchesPythonReference) {
  // The same weights as models/tiny-random, run in bfloat16 (the pipeline converts the modules).
  const std::string bundle = BuiltBundle("--dtype bfloat16");
  const ModelManifest manifest = LoadManifest(bundle);
  EXPECT_EQ(manifest.dtypes.generator, DType::kBFloat16);
  std::unique_ptr<Pipeline> pipeline = MakePipeline(manifest);
  std::unique_ptr<Pipeline> float32 = MakePipeline(manifest_);
  ASSERT_NE(pipeline, nullptr);
  ASSERT_NE(float32, nullptr);
  const std::vector<Pipeline::Input> batch = {{InputIds(manifest, {320, 1125}), 3},
                                              {InputIds(manifest, {539}), 4}};
  const std::vector<std::string> images = RunOk(*pipeline, batch, 32, 32);
  const std::vector<std::string> reference = ReferenceImages(bundle, batch, 32, 32, 1);
  const std::vector<std::string> float32_images = RunOk(*float32, batch, 32, 32);
  ASSERT_EQ(images.size(), 2u);
  ASSERT_EQ(reference.size(), 2u);
  ASSERT_EQ(float32_images.size(), 2u);
  for (size_t i = 0; i < images.size(); ++i) {
    ExpectWithinOneLevel(reference[i], images[i],
                         absl::StrCat("bfloat16 C++ vs Python reference, image ", i));
    EXPECT_GT(DifferingPixels(images[i], float32_images[i]), images[i].size() / 10)
        << "bfloat16 had no effect";
  }
}

// The channels-last decoder changes only float rounding: with it on and off, models/fashion-dmd
// (the bundle it was measured on: 13 convolutions in its decoder) agrees with the Python reference.
TEST(PipelineChannelsLastTest, FashionDmdMatchesPythonReferenceEitherWay) {
  const std::string bundle = SourcePath("models/fashion-dmd").string();
  const ModelManifest manifest = LoadManifest(bundle);
  const std::vector<Pipeline::Input> batch = {{InputIds(manifest, {320, 1125}), 3},
                                              {InputIds(manifest, {539}), 4}};
  const std::vector<std::string> reference =
      ReferenceImages(bundle, batch, manifest.width, manifest.height, manifest.channels);
  ASSERT_EQ(reference.size(), 2u);
  for (const bool channels_last : {false, true}) {
    std::unique_ptr<Pipeline> pipeline =
        MakePipeline(manifest, {.channels_last_decoder = channels_last});
    ASSERT_NE(pipeline, nullptr);
    const std::vector<std::string> images =
        RunOk(*pipeline, batch, manifest.width, manifest.height);
    ASSERT_EQ(images.size(), 2u);
    for (size_t i = 0; i < images.size(); ++i) {
      ExpectWithinOneLevel(reference[i], images[i],
                           absl::StrCat("channels_last_decoder=", channels_last,
                                        " vs Python reference, image ", i));
    }
  }
}

// A copy of models/tiny-random in a temporary directory, with `edit` applied to its model.json.
std::string EditedBundleCopy(const std::function<void(json&)>& edit) {
  const std::string dir = MakeTempDir();
  fs::copy(SourcePath("models/tiny-random"), dir, fs::copy_options::recursive);
  json manifest = json::parse(ReadFile(SourcePath("models/tiny-random/model.json")));
  edit(manifest);
  std::ofstream(fs::path(dir) / "model.json") << manifest.dump(2);
  return dir;
}

TEST_F(PipelineTest, UnloadableTorchScriptNamesTheFile) {
  const std::string dir = EditedBundleCopy([](json&) {});
  std::ofstream(fs::path(dir) / "generator.pt") << "not a zip archive";
  const ModelManifest manifest = LoadManifest(dir);
  absl::StatusOr<std::unique_ptr<Pipeline>> pipeline = Pipeline::Create(manifest, {});
  EXPECT_EQ(pipeline.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pipeline.status().message(),
              HasSubstr("components.generator: cannot load TorchScript " + dir + "/generator.pt"));
}

TEST_F(PipelineTest, ComponentOutputNotMatchingTheManifestIsAnInternalError) {
  // The decoder makes 1 channel; this manifest says 3.
  const std::string dir = EditedBundleCopy([](json& m) { m["image"]["channels"] = 3; });
  std::unique_ptr<Pipeline> pipeline = MakePipeline(LoadManifest(dir));
  ASSERT_NE(pipeline, nullptr);
  absl::StatusOr<Pipeline::Output> output =
      pipeline->Run({{InputIds(manifest_, {320}), 1}}, 32, 32);
  EXPECT_EQ(output.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(
      output.status().message(),
      HasSubstr("decoder returned a tensor of shape [1, 1, 32, 32], expected [1, 3, 32, 32]"));

  const absl::Status warmup = pipeline->Warmup();
  EXPECT_EQ(warmup.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(warmup.message(), HasSubstr("warmup of model tiny-random at 32x32, batch size 1: "));
}

TEST_F(PipelineTest, LibtorchErrorsBecomeStatusesWithoutPaths) {
  // The tiny text encoder has 77 positions: 78 token ids make it throw inside TorchScript.
  const std::string dir = EditedBundleCopy([](json& m) { m["tokenizer"]["max_length"] = 78; });
  const ModelManifest manifest = LoadManifest(dir);
  std::unique_ptr<Pipeline> pipeline = MakePipeline(manifest);
  ASSERT_NE(pipeline, nullptr);
  absl::StatusOr<Pipeline::Output> output =
      pipeline->Run({{std::vector<int32_t>(78, 1), 1}}, 32, 32);
  EXPECT_EQ(output.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(output.status().message(), HasSubstr("model tiny-random: text_encoder failed"));
  EXPECT_THAT(output.status().message(), Not(HasSubstr(dir)));
  EXPECT_THAT(output.status().message(), Not(HasSubstr(".py")));
}

// ---- dmdserve.bundle/v2 (SDXL-shaped bundles) ----

TEST_F(PipelineTest, SecondTokenizationIsAPromptOfItsOwn) {
  const std::string bundle = BuiltBundle("--sdxl --steps 2 --step-mode renoise");
  const ModelManifest manifest = LoadManifest(bundle);
  std::unique_ptr<Pipeline> pipeline = MakePipeline(manifest);
  ASSERT_NE(pipeline, nullptr);
  // Same first ids, different second ids (as "boot!!" gives): not one prompt to the encoder.
  Pipeline::Input plain = MakeInput(manifest, {320, 1125}, 5);
  Pipeline::Input split = plain;
  split.input_ids_2[3] = 0;
  const std::vector<Pipeline::Input> batch = {plain, split};
  const std::vector<std::string> images = RunOk(*pipeline, batch, 64, 32);
  ASSERT_EQ(images.size(), 2u);
  EXPECT_GT(DifferingPixels(images[0], images[1]), images[0].size() / 4);
  const std::vector<std::string> reference = ReferenceImages(bundle, batch, 64, 32, 1);
  ASSERT_EQ(reference.size(), 2u);
  ExpectWithinOneLevel(reference[0], images[0], "v2 plain vs Python reference");
  ExpectWithinOneLevel(reference[1], images[1], "v2 split vs Python reference");
}

TEST_F(PipelineTest, V2InputsMustMatchTheTokenizers) {
  const ModelManifest v2 = LoadManifest(BuiltBundle("--sdxl --steps 2 --step-mode renoise"));
  std::unique_ptr<Pipeline> pipeline = MakePipeline(v2);
  ASSERT_NE(pipeline, nullptr);
  Pipeline::Input missing = MakeInput(v2, {320}, 1);
  missing.input_ids_2.clear();
  absl::StatusOr<Pipeline::Output> output = pipeline->Run({missing}, 32, 32);
  EXPECT_EQ(output.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(output.status().message(),
              HasSubstr("batch[0].input_ids_2 has 0 token ids, expected 77"));

  std::unique_ptr<Pipeline> v1 = MakePipeline(manifest_);
  ASSERT_NE(v1, nullptr);
  Pipeline::Input extra = MakeInput(v2, {320}, 1);
  output = v1->Run({extra}, 32, 32);
  EXPECT_EQ(output.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(output.status().message(), HasSubstr("input_ids_2 must be empty"));
}

TEST_F(PipelineTest, TextTimeBundleWithoutAPooledOutputIsAnInternalError) {
  // v1's text encoder returns one tensor; "text_time" needs (hidden states, pooled).
  const std::string dir = EditedBundleCopy([](json& m) {
    m["format"] = "dmdserve.bundle/v2";
    m["conditioning"] = "text_time";
  });
  std::unique_ptr<Pipeline> pipeline = MakePipeline(LoadManifest(dir));
  ASSERT_NE(pipeline, nullptr);
  absl::StatusOr<Pipeline::Output> output =
      pipeline->Run({{InputIds(manifest_, {320}), 1}}, 32, 32);
  EXPECT_EQ(output.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(output.status().message(),
              HasSubstr("text_encoder returned a Tensor, expected a tuple of 2 tensors"));
}

TEST_F(PipelineTest, V2GuidanceWithTheEmptyPromptNeedsBothTokenizations) {
  const ModelManifest manifest = LoadManifest(BuiltBundle("--sdxl --guidance 2"));
  Pipeline::Options options;
  options.uncond_input_ids = InputIds(manifest, {});
  absl::StatusOr<std::unique_ptr<Pipeline>> pipeline = Pipeline::Create(manifest, options);
  EXPECT_EQ(pipeline.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pipeline.status().message(), HasSubstr("uncond_input_ids_2"));
  // Zero unconditional embeddings need no empty prompt at all.
  const ModelManifest zeros =
      LoadManifest(BuiltBundle("--sdxl --steps 2 --guidance 3 --unconditional zeros"));
  EXPECT_TRUE(Pipeline::Create(zeros, {}).ok());
}

}  // namespace
}  // namespace dmdserve
