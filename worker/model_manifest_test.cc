#include "worker/model_manifest.h"

#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "worker/test_util.h"

namespace dmdserve {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

namespace fs = std::filesystem;

using ::dmdserve::testing::MakeTempDir;
using ::dmdserve::testing::ReadFile;
using ::dmdserve::testing::WriteFile;

// Creates (empty) every file `manifest` names, so that Load's existence checks pass.
void CreateReferencedFiles(const json& manifest, const std::string& dir) {
  for (const char* key : {"text_encoder", "generator", "decoder"}) {
    WriteFile(fs::path(dir) / manifest["components"][key].get<std::string>(), "");
  }
  for (const char* tokenizer : {"tokenizer", "tokenizer_2"}) {
    if (!manifest.contains(tokenizer)) continue;
    for (const char* key : {"vocab", "merges"}) {
      WriteFile(fs::path(dir) / manifest[tokenizer][key].get<std::string>(), "");
    }
  }
}

// A valid manifest using every field.
json FullManifest() {
  return json::parse(R"({
    "format": "dmdserve.bundle/v1",
    "name": "test-model_1.0",
    "description": "a test model",
    "image": {"width": 64, "height": 32, "channels": 3, "supported_sizes": [[64, 32], [32, 64]]},
    "latent": {"channels": 4, "downsample_factor": 8},
    "tokenizer": {"vocab": "tok/vocab.json", "merges": "tok/merges.txt", "max_length": 16,
                  "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    "components": {"text_encoder": "te.pt", "generator": "gen.pt", "decoder": "dec.pt"},
    "prediction_type": "sample",
    "schedule": {"timesteps": [999, 499], "alphas_cumprod": [0.01, 0.3], "step_mode": "renoise"},
    "guidance_scale": 2.5,
    "latent_scaling_factor": 0.5,
    "dtype": {"generator": "bfloat16", "decoder": "float16"},
    "batch_sizes": [1, 3, 6],
    "max_images_per_request": 12
  })");
}

// A valid manifest with only the required fields.
json MinimalManifest() {
  json m = FullManifest();
  m.erase("description");
  m["image"].erase("supported_sizes");
  for (const char* key : {"max_length", "bos_token", "eos_token", "pad_token"}) {
    m["tokenizer"].erase(key);
  }
  m["schedule"].erase("step_mode");
  for (const char* key : {"guidance_scale", "dtype", "max_images_per_request"}) m.erase(key);
  return m;
}

// A valid v2 manifest using every v2 field.
json FullV2Manifest() {
  json m = FullManifest();
  m["format"] = "dmdserve.bundle/v2";
  m["tokenizer_2"] = json::parse(R"({"vocab": "tok2/vocab.json", "merges": "tok2/merges.txt",
                                      "max_length": 16, "pad_token": "!"})");
  m["conditioning"] = "text_time";
  m["unconditional"] = "zeros";
  m["schedule"]["initial_noise_scale"] = 0.75;
  return m;
}

class ModelManifestTest : public ::testing::Test {
 protected:
  // Writes `manifest` as dir_/model.json (with its files) and loads it.
  absl::StatusOr<ModelManifest> LoadJson(const json& manifest) {
    CreateReferencedFiles(FullV2Manifest(), dir_);
    WriteFile(fs::path(dir_) / "model.json", manifest.dump(2));
    return ModelManifest::Load(dir_);
  }

  const std::string dir_ = MakeTempDir();
};

TEST_F(ModelManifestTest, LoadsEveryField) {
  absl::StatusOr<ModelManifest> m = LoadJson(FullManifest());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->bundle_dir, dir_);
  EXPECT_EQ(m->manifest_path, (fs::path(dir_) / "model.json").string());
  EXPECT_EQ(m->name, "test-model_1.0");
  EXPECT_EQ(m->description, "a test model");
  EXPECT_EQ(m->width, 64);
  EXPECT_EQ(m->height, 32);
  EXPECT_EQ(m->channels, 3);
  EXPECT_EQ(m->supported_sizes, (std::vector<ModelManifest::Size>{{64, 32}, {32, 64}}));
  EXPECT_EQ(m->latent_channels, 4);
  EXPECT_EQ(m->downsample_factor, 8);
  EXPECT_EQ(m->tokenizer.vocab_path, (fs::path(dir_) / "tok/vocab.json").string());
  EXPECT_EQ(m->tokenizer.merges_path, (fs::path(dir_) / "tok/merges.txt").string());
  EXPECT_EQ(m->tokenizer.max_length, 16);
  EXPECT_EQ(m->tokenizer.bos_token, "<s>");
  EXPECT_EQ(m->tokenizer.eos_token, "</s>");
  EXPECT_EQ(m->tokenizer.pad_token, "<pad>");
  EXPECT_EQ(m->components.text_encoder, (fs::path(dir_) / "te.pt").string());
  EXPECT_EQ(m->components.generator, (fs::path(dir_) / "gen.pt").string());
  EXPECT_EQ(m->components.decoder, (fs::path(dir_) / "dec.pt").string());
  EXPECT_EQ(m->prediction_type, PredictionType::kSample);
  EXPECT_EQ(m->schedule.timesteps, (std::vector<int>{999, 499}));
  EXPECT_EQ(m->schedule.alphas_cumprod, (std::vector<double>{0.01, 0.3}));
  EXPECT_EQ(m->schedule.step_mode, StepMode::kRenoise);
  EXPECT_EQ(m->guidance_scale, 2.5);
  EXPECT_TRUE(m->uses_guidance());
  EXPECT_EQ(m->latent_scaling_factor, 0.5);
  EXPECT_EQ(m->dtypes.text_encoder, DType::kFloat32);
  EXPECT_EQ(m->dtypes.generator, DType::kBFloat16);
  EXPECT_EQ(m->dtypes.decoder, DType::kFloat16);
  EXPECT_EQ(m->batch_sizes, (std::vector<int>{1, 3, 6}));
  EXPECT_EQ(m->max_batch_size(), 6);
  EXPECT_EQ(m->max_images_per_request, 12);
  EXPECT_EQ(m->steps(), 2);
}

TEST_F(ModelManifestTest, OptionalFieldsHaveDocumentedDefaults) {
  absl::StatusOr<ModelManifest> m = LoadJson(MinimalManifest());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->description, "");
  EXPECT_EQ(m->supported_sizes, (std::vector<ModelManifest::Size>{{64, 32}}));
  EXPECT_EQ(m->tokenizer.max_length, 77);
  EXPECT_EQ(m->tokenizer.bos_token, "<|startoftext|>");
  EXPECT_EQ(m->tokenizer.eos_token, "<|endoftext|>");
  EXPECT_EQ(m->tokenizer.pad_token, "<|endoftext|>");
  EXPECT_EQ(m->schedule.step_mode, StepMode::kDdim);
  EXPECT_EQ(m->guidance_scale, 1.0);
  EXPECT_FALSE(m->uses_guidance());
  EXPECT_EQ(m->dtypes.text_encoder, DType::kFloat32);
  EXPECT_EQ(m->dtypes.generator, DType::kFloat32);
  EXPECT_EQ(m->dtypes.decoder, DType::kFloat32);
  EXPECT_EQ(m->max_images_per_request, 6);  // the largest batch size
}

TEST_F(ModelManifestTest, V1ManifestsHaveV1Semantics) {
  absl::StatusOr<ModelManifest> m = LoadJson(FullManifest());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->format_version, 1);
  EXPECT_FALSE(m->tokenizer_2.has_value());
  EXPECT_EQ(m->conditioning, Conditioning::kText);
  EXPECT_EQ(m->unconditional, Unconditional::kEmptyPrompt);
  EXPECT_EQ(m->schedule.initial_noise_scale, 1.0);
}

TEST_F(ModelManifestTest, LoadsEveryV2Field) {
  absl::StatusOr<ModelManifest> m = LoadJson(FullV2Manifest());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->format_version, 2);
  ASSERT_TRUE(m->tokenizer_2.has_value());
  EXPECT_EQ(m->tokenizer_2->vocab_path, (fs::path(dir_) / "tok2/vocab.json").string());
  EXPECT_EQ(m->tokenizer_2->merges_path, (fs::path(dir_) / "tok2/merges.txt").string());
  EXPECT_EQ(m->tokenizer_2->max_length, 16);
  EXPECT_EQ(m->tokenizer_2->pad_token, "!");
  EXPECT_EQ(m->tokenizer_2->eos_token, "<|endoftext|>");  // defaults, not tokenizer's "</s>"
  EXPECT_EQ(m->conditioning, Conditioning::kTextTime);
  EXPECT_EQ(m->unconditional, Unconditional::kZeros);
  EXPECT_EQ(m->schedule.initial_noise_scale, 0.75);
  EXPECT_EQ(m->name, "test-model_1.0");  // the v1 fields as before
  EXPECT_EQ(m->schedule.step_mode, StepMode::kRenoise);
}

TEST_F(ModelManifestTest, V2FieldsAreOptionalInV2) {
  json manifest = FullManifest();
  manifest["format"] = "dmdserve.bundle/v2";
  absl::StatusOr<ModelManifest> m = LoadJson(manifest);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->format_version, 2);
  EXPECT_FALSE(m->tokenizer_2.has_value());
  EXPECT_EQ(m->conditioning, Conditioning::kText);
  EXPECT_EQ(m->unconditional, Unconditional::kEmptyPrompt);
  EXPECT_EQ(m->schedule.initial_noise_scale, 1.0);
}

TEST_F(ModelManifestTest, BadV2FieldsNameTheField) {
  struct Case {
    const char* pointer;
    json value;
    const char* field;
    const char* shown;
  };
  const Case cases[] = {
      {"/tokenizer_2/max_length", 77, "tokenizer_2.max_length", "must equal tokenizer.max_length"},
      {"/tokenizer_2/vocab", nullptr, "tokenizer_2.vocab", "missing required field"},
      {"/tokenizer_2/pad", "!", "tokenizer_2.pad", "unknown field"},
      {"/tokenizer_2/pad_token", "", "tokenizer_2.pad_token", "\"\""},
      {"/conditioning", "pooled", "conditioning", "\"text\", \"text_time\", got \"pooled\""},
      {"/unconditional", "none", "unconditional", "got \"none\""},
      {"/schedule/initial_noise_scale", 0, "schedule.initial_noise_scale", "(0, 1], got 0"},
      {"/schedule/initial_noise_scale", 1.5, "schedule.initial_noise_scale", "got 1.5"},
  };
  for (const Case& c : cases) {
    json manifest = FullV2Manifest();
    const json::json_pointer pointer(c.pointer);
    if (c.value.is_null()) {
      manifest.at(pointer.parent_pointer()).erase(pointer.back());
    } else {
      manifest[pointer] = c.value;
    }
    absl::StatusOr<ModelManifest> m = LoadJson(manifest);
    ASSERT_FALSE(m.ok()) << c.pointer;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
    EXPECT_THAT(m.status().message(), HasSubstr(std::string(c.field) + ": ")) << c.pointer;
    EXPECT_THAT(m.status().message(), HasSubstr(c.shown)) << c.pointer;
  }
}

TEST_F(ModelManifestTest, DTypeStringAppliesToEveryComponent) {
  json manifest = FullManifest();
  manifest["dtype"] = "float16";
  absl::StatusOr<ModelManifest> m = LoadJson(manifest);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->dtypes.text_encoder, DType::kFloat16);
  EXPECT_EQ(m->dtypes.generator, DType::kFloat16);
  EXPECT_EQ(m->dtypes.decoder, DType::kFloat16);
  EXPECT_STREQ(DTypeName(m->dtypes.decoder), "float16");
}

TEST(DTypeOverrideTest, OneNameSetsEveryComponentAndPairsSetTheNamedOnes) {
  using DTypes = ModelManifest::ComponentDTypes;
  DTypes dtypes{DType::kFloat16, DType::kFloat16, DType::kFloat32};
  ASSERT_TRUE(ApplyDTypeOverride("", dtypes).ok());
  EXPECT_EQ(dtypes.text_encoder, DType::kFloat16);
  EXPECT_EQ(dtypes.decoder, DType::kFloat32);

  ASSERT_TRUE(ApplyDTypeOverride("bfloat16", dtypes).ok());
  EXPECT_EQ(dtypes.text_encoder, DType::kBFloat16);
  EXPECT_EQ(dtypes.generator, DType::kBFloat16);
  EXPECT_EQ(dtypes.decoder, DType::kBFloat16);

  ASSERT_TRUE(ApplyDTypeOverride("generator=float16,decoder=float32", dtypes).ok());
  EXPECT_EQ(dtypes.text_encoder, DType::kBFloat16);  // not named: unchanged
  EXPECT_EQ(dtypes.generator, DType::kFloat16);
  EXPECT_EQ(dtypes.decoder, DType::kFloat32);
}

TEST(DTypeOverrideTest, BadSpecsNameTheBadPartAndChangeNothing) {
  ModelManifest::ComponentDTypes dtypes;
  for (const auto& [spec, part] : std::vector<std::pair<std::string, std::string>>{
           {"half", "\"half\""},
           {"generator=float16,vae=float32", "\"vae=float32\""},
           {"generator=fp16", "\"generator=fp16\""},
           {"generator", "\"generator\""},
           {"decoder=float32,", "\"\""}}) {
    const absl::Status status = ApplyDTypeOverride(spec, dtypes);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << spec;
    EXPECT_THAT(status.message(), HasSubstr("bad part " + part)) << spec;
    EXPECT_EQ(dtypes.generator, DType::kFloat32) << spec;
    EXPECT_EQ(dtypes.decoder, DType::kFloat32) << spec;
  }
}

TEST_F(ModelManifestTest, SizesAndLatentShapes) {
  absl::StatusOr<ModelManifest> m = LoadJson(FullManifest());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE(m->SupportsSize(64, 32));
  EXPECT_TRUE(m->SupportsSize(32, 64));
  EXPECT_FALSE(m->SupportsSize(32, 32));
  EXPECT_EQ(m->LatentShape(64, 32), (std::array<int64_t, 3>{4, 4, 8}));
  EXPECT_EQ(m->LatentShape(32, 64), (std::array<int64_t, 3>{4, 8, 4}));
}

struct BadCase {
  std::string pointer;  // JSON pointer into FullManifest() to replace
  json value;           // new value; null: remove the member
  absl::StatusCode code;
  std::string field;  // JSON path the error must name
  std::string shown;  // the bad value as the error must show it
};

class BadManifestTest : public ModelManifestTest, public ::testing::WithParamInterface<BadCase> {};

TEST_P(BadManifestTest, ErrorNamesFileFieldAndValue) {
  const BadCase& c = GetParam();
  json manifest = FullManifest();
  const json::json_pointer pointer(c.pointer);
  if (c.value.is_null()) {
    manifest.at(pointer.parent_pointer()).erase(pointer.back());
  } else {
    manifest[pointer] = c.value;
  }
  absl::StatusOr<ModelManifest> m = LoadJson(manifest);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), c.code) << m.status();
  const std::string message(m.status().message());
  EXPECT_THAT(message, HasSubstr((fs::path(dir_) / "model.json").string() + ": " + c.field + ": "));
  EXPECT_THAT(message, HasSubstr(c.shown));
}

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
constexpr absl::StatusCode kNotFound = absl::StatusCode::kNotFound;

INSTANTIATE_TEST_SUITE_P(
    Fields, BadManifestTest,
    ::testing::Values(
        BadCase{"/format", "dmdserve.bundle/v3", kInvalid, "format", "\"dmdserve.bundle/v3\""},
        BadCase{"/conditioning", "text_time", kInvalid, "conditioning",
                "needs \"format\": \"dmdserve.bundle/v2\""},
        BadCase{"/schedule/initial_noise_scale", 0.5, kInvalid, "schedule.initial_noise_scale",
                "needs \"format\": \"dmdserve.bundle/v2\""},
        BadCase{"/name", "has space", kInvalid, "name", "\"has space\""},
        BadCase{"/name", nullptr, kInvalid, "name", "missing required field"},
        BadCase{"/name", 7, kInvalid, "name", "must be a string, got 7"},
        BadCase{"/guidance_scal", 3, kInvalid, "guidance_scal", "unknown field"},
        BadCase{"/image", 5, kInvalid, "image", "must be an object, got 5"},
        BadCase{"/image/width", 0, kInvalid, "image.width", "got 0"},
        BadCase{"/image/width", 64.5, kInvalid, "image.width", "must be an integer, got 64.5"},
        BadCase{"/image/channels", 2, kInvalid, "image.channels", "must be 1 or 3, got 2"},
        BadCase{"/image/channels", 4, kInvalid, "image.channels", "got 4"},
        BadCase{"/image/supported_sizes", json::parse("[[32, 64], [64, 32]]"), kInvalid,
                "image.supported_sizes[0]", "[32,64]"},
        BadCase{"/image/supported_sizes/1", json::parse("[64, 32]"), kInvalid,
                "image.supported_sizes[1]", "duplicate size, got [64,32]"},
        BadCase{"/image/supported_sizes/1", json::parse("[36, 64]"), kInvalid,
                "image.supported_sizes[1]",
                "[36, 64] is not divisible by latent.downsample_factor 8"},
        BadCase{"/image/supported_sizes/1", json::parse("[32]"), kInvalid,
                "image.supported_sizes[1]", "[32]"},
        BadCase{"/image/supported_sizes/1/1", -64, kInvalid, "image.supported_sizes[1][1]", "-64"},
        BadCase{"/latent/downsample_factor", 5, kInvalid, "image",
                "[64, 32] is not divisible by latent.downsample_factor 5"},
        BadCase{"/latent/channels", nullptr, kInvalid, "latent.channels", "missing required field"},
        BadCase{"/tokenizer/max_length", 1, kInvalid, "tokenizer.max_length", "got 1"},
        BadCase{"/tokenizer/vocab", "tok/missing.json", kNotFound, "tokenizer.vocab",
                "tok/missing.json"},
        BadCase{"/tokenizer/pad_token", "", kInvalid, "tokenizer.pad_token", "\"\""},
        BadCase{"/components/generator", "gone.pt", kNotFound, "components.generator", "gone.pt"},
        BadCase{"/components/decoder", "", kInvalid, "components.decoder", "\"\""},
        BadCase{"/components/generator", "../../etc/passwd", kInvalid, "components.generator",
                "must be a path inside the bundle directory"},
        BadCase{"/components/generator", "sub/../../gen.pt", kInvalid, "components.generator",
                "\"sub/../../gen.pt\""},
        BadCase{"/tokenizer/vocab", "/etc/passwd", kInvalid, "tokenizer.vocab",
                "no absolute path"},
        BadCase{"/components/unet", "gen.pt", kInvalid, "components.unet", "unknown field"},
        BadCase{"/prediction_type", "v_prediction", kInvalid, "prediction_type",
                "must be one of \"epsilon\", \"sample\", got \"v_prediction\""},
        BadCase{"/schedule/timesteps/0", 1000, kInvalid, "schedule.timesteps[0]", "got 1000"},
        BadCase{"/schedule/timesteps/1", 999, kInvalid, "schedule.timesteps[1]", "got 999"},
        BadCase{"/schedule/timesteps", json::array(), kInvalid, "schedule.timesteps", "[]"},
        BadCase{"/schedule/alphas_cumprod/0", 1.5, kInvalid, "schedule.alphas_cumprod[0]",
                "must be in (0, 1), got 1.5"},
        BadCase{"/schedule/alphas_cumprod/0", 0, kInvalid, "schedule.alphas_cumprod[0]", "got 0"},
        BadCase{"/schedule/alphas_cumprod/1", 0.001, kInvalid, "schedule.alphas_cumprod[1]",
                "got 0.001"},
        BadCase{"/schedule/alphas_cumprod", json::parse("[0.01]"), kInvalid,
                "schedule.alphas_cumprod", "has 1 values but schedule.timesteps has 2"},
        BadCase{"/schedule/step_mode", "euler", kInvalid, "schedule.step_mode", "\"euler\""},
        BadCase{"/guidance_scale", 0.5, kInvalid, "guidance_scale", "got 0.5"},
        BadCase{"/latent_scaling_factor", -1, kInvalid, "latent_scaling_factor", "got -1"},
        BadCase{"/latent_scaling_factor", "0.18", kInvalid, "latent_scaling_factor",
                "must be a finite number, got \"0.18\""},
        BadCase{"/dtype", "float64", kInvalid, "dtype", "\"float64\""},
        BadCase{"/dtype", 16, kInvalid, "dtype", "got 16"},
        BadCase{"/dtype/generator", "int8", kInvalid, "dtype.generator", "\"int8\""},
        BadCase{"/dtype/unet", "float16", kInvalid, "dtype.unet", "unknown field"},
        BadCase{"/batch_sizes/2", 2, kInvalid, "batch_sizes[2]", "got 2"},
        BadCase{"/batch_sizes/0", json(18446744073709551615ULL), kInvalid, "batch_sizes[0]",
                "got 18446744073709551615"},
        BadCase{"/batch_sizes", json::array(), kInvalid, "batch_sizes", "[]"},
        BadCase{"/max_images_per_request", 0, kInvalid, "max_images_per_request", "got 0"}));

TEST_F(ModelManifestTest, MissingBundleOrManifestIsNotFound) {
  absl::StatusOr<ModelManifest> m = ModelManifest::Load(dir_ + "/no-such-bundle");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(m.status().message(), HasSubstr("no-such-bundle"));
  m = ModelManifest::Load(dir_);  // exists, but holds no model.json
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(m.status().message(), HasSubstr("model.json"));
}

TEST_F(ModelManifestTest, MalformedJsonNamesTheFile) {
  WriteFile(fs::path(dir_) / "model.json", "{\"format\": \"dmdserve.bundle/v1\",");
  absl::StatusOr<ModelManifest> m = ModelManifest::Load(dir_);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(), HasSubstr((fs::path(dir_) / "model.json").string()));
  EXPECT_THAT(m.status().message(), HasSubstr("invalid JSON"));
}

TEST_F(ModelManifestTest, TopLevelMustBeAnObject) {
  absl::StatusOr<ModelManifest> m = LoadJson(json::array({1, 2}));
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(), HasSubstr("must be an object, got [1,2]"));
}

// SD's scaled-linear schedule, computed here independently of the manifests under test.
double SdAlphaCumprod(int t) {
  const double start = std::sqrt(0.00085);
  const double end = std::sqrt(0.012);
  double alpha_cumprod = 1.0;
  for (int i = 0; i <= t; ++i) {
    const double beta = std::pow(start + (end - start) * i / 999.0, 2);
    alpha_cumprod *= 1.0 - beta;
  }
  return alpha_cumprod;
}

// The `json` code blocks of docs/BUNDLE.md that are manifests.
std::vector<json> DocumentedManifests() {
  std::istringstream doc(ReadFile(fs::path(DMDSERVE_SOURCE_DIR) / "docs/BUNDLE.md"));
  std::vector<json> manifests;
  std::string line;
  std::string block;
  bool in_block = false;
  while (std::getline(doc, line)) {
    if (!in_block && line == "```json") {
      in_block = true;
      block.clear();
    } else if (in_block && line == "```") {
      in_block = false;
      json parsed = json::parse(block);
      const std::string format = parsed.value("format", "");
      if (format == ModelManifest::kFormat || format == ModelManifest::kFormatV2) {
        manifests.push_back(parsed);
      }
    } else if (in_block) {
      block += line + "\n";
    }
  }
  return manifests;
}

TEST(DocumentedManifestsTest, Dmd2ExamplesInBundleDocLoad) {
  const std::vector<json> manifests = DocumentedManifests();
  ASSERT_EQ(manifests.size(), 2u) << "expected the SD1.5 and SDXL examples in docs/BUNDLE.md";
  std::vector<ModelManifest> loaded;
  for (const json& manifest : manifests) {
    const std::string dir = MakeTempDir();
    CreateReferencedFiles(manifest, dir);
    WriteFile(fs::path(dir) / "model.json", manifest.dump());
    absl::StatusOr<ModelManifest> m = ModelManifest::Load(dir);
    ASSERT_TRUE(m.ok()) << m.status();
    loaded.push_back(*m);
  }

  const ModelManifest& sd15 = loaded[0];
  EXPECT_EQ(sd15.name, "dmd2-sd15");
  EXPECT_EQ(sd15.schedule.timesteps, (std::vector<int>{999}));
  EXPECT_NEAR(sd15.schedule.alphas_cumprod[0], SdAlphaCumprod(999), 1e-7);
  EXPECT_EQ(sd15.prediction_type, PredictionType::kEpsilon);
  EXPECT_EQ(sd15.latent_scaling_factor, 0.18215);
  EXPECT_FALSE(sd15.uses_guidance());
  EXPECT_EQ(sd15.LatentShape(512, 512), (std::array<int64_t, 3>{4, 64, 64}));

  const ModelManifest& sdxl = loaded[1];
  EXPECT_EQ(sdxl.name, "dmd2-sdxl-4step");
  EXPECT_EQ(sdxl.schedule.timesteps, (std::vector<int>{999, 749, 499, 249}));
  ASSERT_EQ(sdxl.schedule.alphas_cumprod.size(), 4u);
  for (int k = 0; k < 4; ++k) {
    EXPECT_NEAR(sdxl.schedule.alphas_cumprod[k], SdAlphaCumprod(sdxl.schedule.timesteps[k]), 1e-6)
        << "step " << k;
  }
  EXPECT_EQ(sdxl.schedule.step_mode, StepMode::kRenoise);
  EXPECT_EQ(sdxl.latent_scaling_factor, 0.13025);
  EXPECT_EQ(sdxl.dtypes.decoder, DType::kFloat32);
  EXPECT_EQ(sdxl.dtypes.generator, DType::kFloat16);
  EXPECT_EQ(sdxl.format_version, 2);
  ASSERT_TRUE(sdxl.tokenizer_2.has_value());
  EXPECT_EQ(sdxl.tokenizer_2->pad_token, "!");
  EXPECT_EQ(sdxl.conditioning, Conditioning::kTextTime);
  EXPECT_EQ(sdxl.unconditional, Unconditional::kZeros);
}

TEST(CommittedBundleTest, TinyRandomLoads) {
  absl::StatusOr<ModelManifest> m =
      ModelManifest::Load((fs::path(DMDSERVE_SOURCE_DIR) / "models/tiny-random").string());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->name, "tiny-random");
  EXPECT_EQ(m->channels, 1);
  EXPECT_EQ(m->LatentShape(m->width, m->height), (std::array<int64_t, 3>{4, 8, 8}));
  EXPECT_EQ(m->schedule.timesteps, (std::vector<int>{999}));
  EXPECT_NEAR(m->schedule.alphas_cumprod[0], SdAlphaCumprod(999), 1e-7);
  EXPECT_EQ(m->batch_sizes, (std::vector<int>{1, 2, 4, 8}));
  EXPECT_EQ(m->max_images_per_request, 8);
}

}  // namespace
}  // namespace dmdserve
