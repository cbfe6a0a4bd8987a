#include "worker/model_manifest.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "nlohmann/json.hpp"

namespace dmdserve {
namespace {

using json = nlohmann::json;

constexpr int kMaxPixels = 8192;  // per image side
constexpr int kMaxBatch = 1024;   // batch sizes and images per request
constexpr int kMaxLatentChannels = 64;
constexpr int kMaxDownsampleFactor = 64;
constexpr int kMaxTokens = 4096;
constexpr int kTrainTimesteps = 1000;  // timesteps are in [0, kTrainTimesteps)
constexpr size_t kMaxNameLength = 64;

struct IntRange {
  int64_t min;
  int64_t max;
};

// A JSON value for an error message, cut to a readable length.
std::string Show(const json& value) {
  constexpr size_t kMaxChars = 80;
  std::string text = value.dump();
  if (text.size() > kMaxChars) text = text.substr(0, kMaxChars) + "...";
  return text;
}

// The last component of a JSON path ("schedule.step_mode" -> "step_mode").
absl::string_view KeyOf(absl::string_view path) {
  const size_t dot = path.rfind('.');
  return dot == absl::string_view::npos ? path : path.substr(dot + 1);
}

std::string Index(absl::string_view path, size_t i) { return absl::StrCat(path, "[", i, "]"); }

// Reads typed values out of the parsed model.json. Fields are addressed by their JSON path
// ("image.width"); its last component is the key within the given parent object. The first error
// is kept (and later reads return their fallback), so a loader can read every field in a row and
// check status() once; cross-field checks should run only while ok().
class Reader {
 public:
  explicit Reader(std::string file) : file_(std::move(file)) {}

  bool ok() const { return status_.ok(); }
  const absl::Status& status() const { return status_; }

  void Fail(absl::string_view path, absl::string_view message,
            absl::StatusCode code = absl::StatusCode::kInvalidArgument) {
    if (!ok()) return;
    status_ = absl::Status(code, path.empty() ? absl::StrCat(file_, ": ", message)
                                              : absl::StrCat(file_, ": ", path, ": ", message));
  }
  void FailValue(absl::string_view path, const json& value, absl::string_view requirement) {
    Fail(path, absl::StrCat(requirement, ", got ", Show(value)));
  }

  // An object with no keys outside `allowed`. Absent and optional: an empty object.
  const json& Object(const json& parent, absl::string_view path, bool required,
                     absl::Span<const absl::string_view> allowed) {
    static const json* const kEmpty = new json(json::object());
    const json* value = Member(parent, path, required);
    if (value == nullptr) return *kEmpty;
    return CheckObject(*value, path, allowed) ? *value : *kEmpty;
  }

  // Checks that `value` is an object whose keys are all in `allowed`.
  bool CheckObject(const json& value, absl::string_view path,
                   absl::Span<const absl::string_view> allowed) {
    if (!value.is_object()) {
      FailValue(path, value, "must be an object");
      return false;
    }
    for (const auto& item : value.items()) {
      if (std::find(allowed.begin(), allowed.end(), item.key()) == allowed.end()) {
        const std::string field = path.empty() ? item.key() : absl::StrCat(path, ".", item.key());
        Fail(field, absl::StrCat("unknown field (allowed: ", absl::StrJoin(allowed, ", "), ")"));
        return false;
      }
    }
    return true;
  }

  // A non-empty array. Absent and optional: an empty array.
  const json& Array(const json& parent, absl::string_view path, bool required) {
    static const json* const kEmpty = new json(json::array());
    const json* value = Member(parent, path, required);
    if (value == nullptr) return *kEmpty;
    if (!value->is_array() || value->empty()) {
      FailValue(path, *value, "must be a non-empty array");
      return *kEmpty;
    }
    return *value;
  }

  // Member readers: an absent member is an error when `fallback` is nullopt, else the fallback.
  int Int(const json& parent, absl::string_view path, IntRange range,
          std::optional<int> fallback = std::nullopt) {
    const json* value = Member(parent, path, !fallback.has_value());
    return value == nullptr ? fallback.value_or(0) : IntValue(*value, path, range);
  }
  double Number(const json& parent, absl::string_view path,
                std::optional<double> fallback = std::nullopt) {
    const json* value = Member(parent, path, !fallback.has_value());
    return value == nullptr ? fallback.value_or(0) : NumberValue(*value, path);
  }
  std::string String(const json& parent, absl::string_view path,
                     std::optional<std::string> fallback = std::nullopt) {
    const json* value = Member(parent, path, !fallback.has_value());
    return value == nullptr ? fallback.value_or("") : StringValue(*value, path);
  }
  // The index in `names` of the string value; absent: `fallback`, or an error when it is -1.
  int Choice(const json& parent, absl::string_view path, absl::Span<const absl::string_view> names,
             int fallback = -1) {
    const json* value = Member(parent, path, fallback == -1);
    return value == nullptr ? std::max(fallback, 0) : ChoiceValue(*value, path, names);
  }
  // A path relative to `bundle_dir`, lexically inside it, naming an existing regular file.
  std::string File(const json& parent, absl::string_view path, const std::string& bundle_dir) {
    const json* value = Member(parent, path, /*required=*/true);
    if (value == nullptr) return "";
    const std::string relative = StringValue(*value, path);
    if (!ok()) return "";
    if (relative.empty()) {
      FailValue(path, *value, "must be a path relative to the bundle directory");
      return "";
    }
    // Lexically inside the bundle: no absolute path, no ".." that climbs out of it. (A symlink
    // inside the bundle is the operator's own choice and is followed.)
    const std::filesystem::path normal = std::filesystem::path(relative).lexically_normal();
    if (normal.is_absolute() || normal.empty() || *normal.begin() == "..") {
      FailValue(path, *value, "must be a path inside the bundle directory (no absolute path or "
                              "'..' leaving it)");
      return "";
    }
    const std::string resolved = (std::filesystem::path(bundle_dir) / relative).string();
    std::error_code error;
    if (!std::filesystem::is_regular_file(resolved, error)) {
      Fail(path, absl::StrCat("file not found: ", resolved), absl::StatusCode::kNotFound);
    }
    return resolved;
  }

  // Value readers, for array elements.
  int IntValue(const json& value, absl::string_view path, IntRange range) {
    if (!value.is_number_integer()) {
      FailValue(path, value, "must be an integer");
      return 0;
    }
    // Unsigned values above INT64_MAX would wrap in get<int64_t>().
    const bool huge =
        value.is_number_unsigned() && value.get<uint64_t>() > static_cast<uint64_t>(range.max);
    if (huge || value.get<int64_t>() < range.min || value.get<int64_t>() > range.max) {
      FailValue(path, value, absl::StrCat("must be in [", range.min, ", ", range.max, "]"));
      return 0;
    }
    return static_cast<int>(value.get<int64_t>());
  }
  double NumberValue(const json& value, absl::string_view path) {
    if (!value.is_number() || !std::isfinite(value.get<double>())) {
      FailValue(path, value, "must be a finite number");
      return 0;
    }
    return value.get<double>();
  }
  std::string StringValue(const json& value, absl::string_view path) {
    if (!value.is_string()) {
      FailValue(path, value, "must be a string");
      return "";
    }
    return value.get<std::string>();
  }
  int ChoiceValue(const json& value, absl::string_view path,
                  absl::Span<const absl::string_view> names) {
    if (value.is_string()) {
      const auto it = std::find(names.begin(), names.end(), value.get<std::string>());
      if (it != names.end()) return static_cast<int>(it - names.begin());
    }
    FailValue(path, value, absl::StrCat("must be one of \"", absl::StrJoin(names, "\", \""), "\""));
    return 0;
  }

 private:
  // The member of `parent` named by the last component of `path`; nullptr when absent (an error
  // when `required`) or after an earlier error.
  const json* Member(const json& parent, absl::string_view path, bool required) {
    if (!ok()) return nullptr;
    const auto it = parent.find(std::string(KeyOf(path)));
    if (it != parent.end()) return &*it;
    if (required) Fail(path, "missing required field");
    return nullptr;
  }

  const std::string file_;
  absl::Status status_;
};

bool ValidName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  for (const char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::string ShowSize(const ModelManifest::Size& size) {
  return absl::StrCat("[", size.width, ", ", size.height, "]");
}

// The manifest's names of the enums, in the same order as kDTypes etc.
constexpr absl::string_view kDTypeNames[] = {"float32", "float16", "bfloat16"};
constexpr DType kDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
constexpr absl::string_view kStepModeNames[] = {"ddim", "renoise"};
constexpr StepMode kStepModes[] = {StepMode::kDdim, StepMode::kRenoise};
constexpr absl::string_view kPredictionTypeNames[] = {"epsilon", "sample"};
constexpr PredictionType kPredictionTypes[] = {PredictionType::kEpsilon, PredictionType::kSample};
constexpr absl::string_view kConditioningNames[] = {"text", "text_time"};
constexpr Conditioning kConditionings[] = {Conditioning::kText, Conditioning::kTextTime};
constexpr absl::string_view kUnconditionalNames[] = {"empty_prompt", "zeros"};
constexpr Unconditional kUnconditionals[] = {Unconditional::kEmptyPrompt, Unconditional::kZeros};

void ReadImage(Reader& r, const json& root, ModelManifest& m) {
  const json& image = r.Object(root, "image", /*required=*/true,
                               {"width", "height", "channels", "supported_sizes"});
  m.width = r.Int(image, "image.width", {1, kMaxPixels});
  m.height = r.Int(image, "image.height", {1, kMaxPixels});
  m.channels = r.Int(image, "image.channels", {1, 3});
  if (r.ok() && m.channels == 2) r.FailValue("image.channels", m.channels, "must be 1 or 3");
  const ModelManifest::Size default_size{m.width, m.height};
  const json& sizes = r.Array(image, "image.supported_sizes", /*required=*/false);
  if (sizes.empty()) m.supported_sizes = {default_size};
  for (size_t i = 0; i < sizes.size() && r.ok(); ++i) {
    const std::string path = Index("image.supported_sizes", i);
    if (!sizes[i].is_array() || sizes[i].size() != 2) {
      r.FailValue(path, sizes[i], "must be a [width, height] pair");
      break;
    }
    const ModelManifest::Size size{r.IntValue(sizes[i][0], Index(path, 0), {1, kMaxPixels}),
                                   r.IntValue(sizes[i][1], Index(path, 1), {1, kMaxPixels})};
    if (i == 0 && !(size == default_size)) {
      r.FailValue(path, sizes[i],
                  absl::StrCat("must be the default size ", ShowSize(default_size),
                               " (image.width, image.height)"));
    } else if (std::find(m.supported_sizes.begin(), m.supported_sizes.end(), size) !=
               m.supported_sizes.end()) {
      r.FailValue(path, sizes[i], "duplicate size");
    }
    m.supported_sizes.push_back(size);
  }
}

void ReadLatent(Reader& r, const json& root, ModelManifest& m) {
  const json& latent =
      r.Object(root, "latent", /*required=*/true, {"channels", "downsample_factor"});
  m.latent_channels = r.Int(latent, "latent.channels", {1, kMaxLatentChannels});
  m.downsample_factor = r.Int(latent, "latent.downsample_factor", {1, kMaxDownsampleFactor});
  for (size_t i = 0; i < m.supported_sizes.size() && r.ok(); ++i) {
    const ModelManifest::Size& size = m.supported_sizes[i];
    if (size.width % m.downsample_factor != 0 || size.height % m.downsample_factor != 0) {
      r.Fail(i == 0 ? "image" : Index("image.supported_sizes", i),
             absl::StrCat("size ", ShowSize(size), " is not divisible by latent.downsample_factor ",
                          m.downsample_factor));
    }
  }
}

// Reads the tokenizer object at `path` ("tokenizer" or "tokenizer_2") into `tokenizer`.
void ReadTokenizer(Reader& r, const json& root, const std::string& path, const std::string& dir,
                   ModelManifest::Tokenizer& tokenizer) {
  const json& tok =
      r.Object(root, path, /*required=*/true,
               {"vocab", "merges", "max_length", "bos_token", "eos_token", "pad_token"});
  auto field = [&path](absl::string_view key) { return absl::StrCat(path, ".", key); };
  tokenizer.vocab_path = r.File(tok, field("vocab"), dir);
  tokenizer.merges_path = r.File(tok, field("merges"), dir);
  tokenizer.max_length = r.Int(tok, field("max_length"), {2, kMaxTokens}, 77);
  for (auto [key, token] : {std::pair{"bos_token", &tokenizer.bos_token},
                            std::pair{"eos_token", &tokenizer.eos_token},
                            std::pair{"pad_token", &tokenizer.pad_token}}) {
    *token = r.String(tok, field(key), *token);
    if (r.ok() && token->empty()) r.FailValue(field(key), *token, "must be a non-empty token");
  }
}

// The v2 fields outside the schedule: tokenizer_2, conditioning, unconditional.
void ReadV2Fields(Reader& r, const json& root, ModelManifest& m) {
  if (root.contains("tokenizer_2")) {
    ModelManifest::Tokenizer& second = m.tokenizer_2.emplace();
    ReadTokenizer(r, root, "tokenizer_2", m.bundle_dir, second);
    if (r.ok() && second.max_length != m.tokenizer.max_length) {
      r.FailValue("tokenizer_2.max_length", second.max_length,
                  absl::StrCat("must equal tokenizer.max_length ", m.tokenizer.max_length));
    }
  }
  m.conditioning = kConditionings[r.Choice(root, "conditioning", kConditioningNames, 0)];
  m.unconditional = kUnconditionals[r.Choice(root, "unconditional", kUnconditionalNames, 0)];
}

// INVALID_ARGUMENT naming the first v2 field a v1 manifest uses.
void CheckNoV2Fields(Reader& r, const json& root) {
  std::vector<std::string> used;
  for (const char* key : {"tokenizer_2", "conditioning", "unconditional"}) {
    if (root.contains(key)) used.push_back(key);
  }
  const auto schedule = root.find("schedule");
  if (schedule != root.end() && schedule->is_object() &&
      schedule->contains("initial_noise_scale")) {
    used.push_back("schedule.initial_noise_scale");
  }
  if (!used.empty()) {
    r.Fail(used.front(), absl::StrCat("needs \"format\": \"", ModelManifest::kFormatV2,
                                      "\" (this manifest says \"", ModelManifest::kFormat, "\")"));
  }
}

void ReadSchedule(Reader& r, const json& root, ModelManifest& m) {
  const json& schedule =
      r.Object(root, "schedule", /*required=*/true,
               {"timesteps", "alphas_cumprod", "step_mode", "initial_noise_scale"});
  const json& timesteps = r.Array(schedule, "schedule.timesteps", /*required=*/true);
  for (size_t k = 0; k < timesteps.size() && r.ok(); ++k) {
    const std::string path = Index("schedule.timesteps", k);
    const int t = r.IntValue(timesteps[k], path, {0, kTrainTimesteps - 1});
    if (r.ok() && k > 0 && t >= m.schedule.timesteps.back()) {
      r.FailValue(path, timesteps[k], "must be less than the previous timestep (decreasing)");
    }
    m.schedule.timesteps.push_back(t);
  }
  const json& alphas = r.Array(schedule, "schedule.alphas_cumprod", /*required=*/true);
  if (r.ok() && alphas.size() != timesteps.size()) {
    r.Fail("schedule.alphas_cumprod",
           absl::StrCat("has ", alphas.size(), " values but schedule.timesteps has ",
                        timesteps.size(), " (one alpha_cumprod per timestep)"));
  }
  for (size_t k = 0; k < alphas.size() && r.ok(); ++k) {
    const std::string path = Index("schedule.alphas_cumprod", k);
    const double a = r.NumberValue(alphas[k], path);
    if (r.ok() && !(a > 0.0 && a < 1.0)) r.FailValue(path, alphas[k], "must be in (0, 1)");
    if (r.ok() && k > 0 && a <= m.schedule.alphas_cumprod.back()) {
      r.FailValue(path, alphas[k],
                  "must be greater than the previous value (less noise at a smaller timestep)");
    }
    m.schedule.alphas_cumprod.push_back(a);
  }
  m.schedule.step_mode = kStepModes[r.Choice(schedule, "schedule.step_mode", kStepModeNames, 0)];
  const double scale = r.Number(schedule, "schedule.initial_noise_scale", 1.0);
  if (r.ok() && !(scale > 0.0 && scale <= 1.0)) {
    r.FailValue("schedule.initial_noise_scale", scale, "must be in (0, 1]");
  }
  m.schedule.initial_noise_scale = scale;
}

void ReadDTypes(Reader& r, const json& root, ModelManifest& m) {
  const auto it = root.find("dtype");
  if (it == root.end()) return;
  if (it->is_string()) {
    const DType dtype = kDTypes[r.ChoiceValue(*it, "dtype", kDTypeNames)];
    m.dtypes = {dtype, dtype, dtype};
    return;
  }
  if (!it->is_object()) {
    r.FailValue("dtype", *it, "must be a dtype name or an object of per-component dtype names");
    return;
  }
  const json& dtype =
      r.Object(root, "dtype", /*required=*/false, {"text_encoder", "generator", "decoder"});
  m.dtypes.text_encoder = kDTypes[r.Choice(dtype, "dtype.text_encoder", kDTypeNames, 0)];
  m.dtypes.generator = kDTypes[r.Choice(dtype, "dtype.generator", kDTypeNames, 0)];
  m.dtypes.decoder = kDTypes[r.Choice(dtype, "dtype.decoder", kDTypeNames, 0)];
}

void ReadBatching(Reader& r, const json& root, ModelManifest& m) {
  const json& sizes = r.Array(root, "batch_sizes", /*required=*/true);
  for (size_t i = 0; i < sizes.size() && r.ok(); ++i) {
    const std::string path = Index("batch_sizes", i);
    const int size = r.IntValue(sizes[i], path, {1, kMaxBatch});
    if (r.ok() && i > 0 && size <= m.batch_sizes.back()) {
      r.FailValue(path, sizes[i], "must be greater than the previous batch size (increasing)");
    }
    m.batch_sizes.push_back(size);
  }
  if (!r.ok()) return;
  m.max_images_per_request =
      r.Int(root, "max_images_per_request", {1, kMaxBatch}, m.max_batch_size());
}

}  // namespace

const char* DTypeName(DType dtype) { return kDTypeNames[static_cast<int>(dtype)].data(); }

absl::Status ApplyDTypeOverride(absl::string_view spec, ModelManifest::ComponentDTypes& dtypes) {
  if (spec.empty()) return absl::OkStatus();
  auto parse = [](absl::string_view name) -> std::optional<DType> {
    for (size_t i = 0; i < std::size(kDTypeNames); ++i) {
      if (name == kDTypeNames[i]) return kDTypes[i];
    }
    return std::nullopt;
  };
  const std::string expected =
      absl::StrCat("expected a dtype (", absl::StrJoin(kDTypeNames, ", "),
                   ") or component=dtype pairs with components text_encoder, generator, decoder");
  if (const std::optional<DType> all = parse(spec); all.has_value()) {
    dtypes = {*all, *all, *all};
    return absl::OkStatus();
  }
  ModelManifest::ComponentDTypes result = dtypes;
  for (const absl::string_view pair : absl::StrSplit(spec, ',')) {
    const std::vector<absl::string_view> parts = absl::StrSplit(pair, absl::MaxSplits('=', 1));
    const std::optional<DType> dtype = parts.size() == 2 ? parse(parts[1]) : std::nullopt;
    DType* target = nullptr;
    if (parts[0] == "text_encoder") target = &result.text_encoder;
    if (parts[0] == "generator") target = &result.generator;
    if (parts[0] == "decoder") target = &result.decoder;
    if (target == nullptr || !dtype.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("dtype override \"", spec, "\": bad part \"", pair, "\"; ", expected));
    }
    *target = *dtype;
  }
  dtypes = result;
  return absl::OkStatus();
}

absl::StatusOr<ModelManifest> ModelManifest::Load(const std::string& bundle_dir) {
  ModelManifest m;
  m.bundle_dir = bundle_dir;
  m.manifest_path = (std::filesystem::path(bundle_dir) / "model.json").string();
  std::error_code error;
  if (!std::filesystem::is_directory(bundle_dir, error)) {
    return absl::NotFoundError(absl::StrCat("model bundle directory not found: ", bundle_dir));
  }
  std::ifstream in(m.manifest_path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot open model manifest ", m.manifest_path, " (is ",
                                            bundle_dir, " a model bundle directory?)"));
  }
  json root;
  try {
    root = json::parse(in);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(m.manifest_path, ": invalid JSON: ", e.what()));
  }

  Reader r(m.manifest_path);
  r.CheckObject(root, "",
                {"format", "name", "description", "image", "latent", "tokenizer", "tokenizer_2",
                 "conditioning", "unconditional", "components", "prediction_type", "schedule",
                 "guidance_scale", "latent_scaling_factor", "dtype", "batch_sizes",
                 "max_images_per_request"});
  const std::string format = r.String(root, "format");
  if (r.ok() && format != kFormat && format != kFormatV2) {
    r.FailValue("format", format,
                absl::StrCat("must be \"", kFormat, "\" or \"", kFormatV2, "\""));
  }
  m.format_version = format == kFormatV2 ? 2 : 1;
  if (m.format_version == 1) CheckNoV2Fields(r, root);
  m.name = r.String(root, "name");
  if (r.ok() && !ValidName(m.name)) {
    r.FailValue("name", m.name, "must be 1 to 64 characters of [A-Za-z0-9._-]");
  }
  m.description = r.String(root, "description", "");
  ReadImage(r, root, m);
  ReadLatent(r, root, m);
  ReadTokenizer(r, root, "tokenizer", bundle_dir, m.tokenizer);
  ReadV2Fields(r, root, m);
  const json& components =
      r.Object(root, "components", /*required=*/true, {"text_encoder", "generator", "decoder"});
  m.components.text_encoder = r.File(components, "components.text_encoder", bundle_dir);
  m.components.generator = r.File(components, "components.generator", bundle_dir);
  m.components.decoder = r.File(components, "components.decoder", bundle_dir);
  m.prediction_type = kPredictionTypes[r.Choice(root, "prediction_type", kPredictionTypeNames)];
  ReadSchedule(r, root, m);
  m.guidance_scale = r.Number(root, "guidance_scale", 1.0);
  if (r.ok() && m.guidance_scale < 1.0) {
    r.FailValue("guidance_scale", m.guidance_scale, "must be >= 1 (1 disables guidance)");
  }
  m.latent_scaling_factor = r.Number(root, "latent_scaling_factor");
  if (r.ok() && m.latent_scaling_factor <= 0.0) {
    r.FailValue("latent_scaling_factor", m.latent_scaling_factor, "must be > 0");
  }
  ReadDTypes(r, root, m);
  ReadBatching(r, root, m);
  if (!r.ok()) return r.status();
  return m;
}

int ModelManifest::SizeIndex(int width, int height) const {
  const auto it = std::find(supported_sizes.begin(), supported_sizes.end(), Size{width, height});
  return it == supported_sizes.end() ? -1 : static_cast<int>(it - supported_sizes.begin());
}

std::string ModelManifest::SupportedSizesText() const {
  std::vector<std::string> sizes;
  for (const Size& size : supported_sizes)
    sizes.push_back(absl::StrCat(size.width, "x", size.height));
  return absl::StrJoin(sizes, ", ");
}

std::array<int64_t, 3> ModelManifest::LatentShape(int width, int height) const {
  return {latent_channels, height / downsample_factor, width / downsample_factor};
}

}  // namespace dmdserve
