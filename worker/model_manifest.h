// ModelManifest: the parsed and validated `model.json` of a model bundle (format
// "dmdserve.bundle/v1" or "dmdserve.bundle/v2"; every field is documented in docs/BUNDLE.md).
// v2 adds what SDXL-shaped models need (a second tokenizer, added conditions, zero unconditional
// embeddings, an initial-noise scale); a v1 manifest that uses a v2 field is an error.
//
// A bundle is a directory holding model.json, the three TorchScript components it names (text
// encoder, generator, decoder) and the tokenizer files. Load() reads and checks the whole manifest
// and that every file it names exists; the first problem found is returned as INVALID_ARGUMENT (or
// NOT_FOUND for a missing file) whose message names the manifest file, the field as a JSON path
// (e.g. `schedule.alphas_cumprod[0]`) and the bad value. Unknown fields are errors, so typos do
// not go unnoticed.
//
// Value type: no libtorch here; copy freely; const methods are thread-safe.
#ifndef DMDSERVE_WORKER_MODEL_MANIFEST_H_
#define DMDSERVE_WORKER_MODEL_MANIFEST_H_

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dmdserve {

// What the generator predicts.
enum class PredictionType {
  kEpsilon,  // the noise; x0 = (z - sqrt(1 - a) * pred) / sqrt(a)
  kSample,   // x0 itself
};

// How a few-step schedule builds the next step's latents from x0.
enum class StepMode {
  kDdim,     // deterministic: re-uses the noise implied by (z, x0)
  kRenoise,  // fresh noise from the image's generator (DMD2's multi-step sampling)
};

// What conditions the generator besides the timestep.
enum class Conditioning {
  kText,      // encoder_hidden_states only (v1)
  kTextTime,  // SDXL: also the text encoder's pooled embedding and the time ids [H, W, 0, 0, H, W]
};

// The unconditional input of classifier-free guidance.
enum class Unconditional {
  kEmptyPrompt,  // the text encoder's output for the empty prompt
  kZeros,        // zero hidden states and pooled embedding (force_zeros_for_empty_prompt)
};

// Floating-point type a TorchScript component runs in.
enum class DType { kFloat32, kFloat16, kBFloat16 };

// "float32", "float16" or "bfloat16".
const char* DTypeName(DType dtype);

struct ModelManifest {
  // The `format` values this version reads.
  static constexpr char kFormat[] = "dmdserve.bundle/v1";
  static constexpr char kFormatV2[] = "dmdserve.bundle/v2";

  struct Size {
    int width = 0;   // pixels
    int height = 0;  // pixels
    bool operator==(const Size& other) const {
      return width == other.width && height == other.height;
    }
  };
  struct Tokenizer {
    std::string vocab_path;   // resolved: bundle_dir joined with model.json's relative path
    std::string merges_path;  // resolved likewise
    int max_length = 77;      // tokens per prompt including BOS and EOS: input_ids length
    std::string bos_token = "<|startoftext|>";
    std::string eos_token = "<|endoftext|>";
    std::string pad_token = "<|endoftext|>";
  };
  // Resolved paths of the TorchScript files (contracts in docs/ARCHITECTURE.md).
  struct Components {
    std::string text_encoder;
    std::string generator;
    std::string decoder;
  };
  struct ComponentDTypes {
    DType text_encoder = DType::kFloat32;
    DType generator = DType::kFloat32;
    DType decoder = DType::kFloat32;
  };
  struct Schedule {
    std::vector<int> timesteps;          // strictly decreasing, in [0, 1000); one per step
    std::vector<double> alphas_cumprod;  // ᾱ at each timestep, in (0, 1), strictly increasing
    StepMode step_mode = StepMode::kDdim;
    double initial_noise_scale = 1.0;  // v2: the first step's z is this times randn; in (0, 1]
  };

  // Reads `bundle_dir`/model.json and validates it (see the file comment).
  static absl::StatusOr<ModelManifest> Load(const std::string& bundle_dir);

  std::string bundle_dir;     // as given to Load()
  std::string manifest_path;  // bundle_dir/model.json
  std::string name;           // [A-Za-z0-9._-]{1,64}
  std::string description;
  int format_version = 1;  // 1 or 2
  int width = 0;  // default image size in pixels
  int height = 0;
  int channels = 0;                   // 1 (grey) or 3 (RGB)
  std::vector<Size> supported_sizes;  // default size first, no duplicates
  int latent_channels = 0;
  int downsample_factor = 0;  // image pixels per latent cell, along each axis
  Tokenizer tokenizer;
  // v2: the second tokenizer (SDXL's pads with "!"); its max_length equals tokenizer's. When set,
  // the text encoder takes both tokenizations.
  std::optional<Tokenizer> tokenizer_2;
  Conditioning conditioning = Conditioning::kText;
  Unconditional unconditional = Unconditional::kEmptyPrompt;
  Components components;
  PredictionType prediction_type = PredictionType::kEpsilon;
  Schedule schedule;
  double guidance_scale = 1.0;  // > 1: classifier-free guidance with the empty prompt
  double latent_scaling_factor = 0.0;
  ComponentDTypes dtypes;
  std::vector<int> batch_sizes;  // strictly increasing; the last is the largest batch
  int max_images_per_request = 0;

  int steps() const { return static_cast<int>(schedule.timesteps.size()); }
  int max_batch_size() const { return batch_sizes.back(); }
  bool uses_guidance() const { return guidance_scale > 1.0; }
  bool SupportsSize(int width, int height) const { return SizeIndex(width, height) >= 0; }
  // Position of width x height in supported_sizes; -1 when unsupported.
  int SizeIndex(int width, int height) const;
  // The supported sizes for messages: "32x32, 64x32".
  std::string SupportedSizesText() const;
  // {latent_channels, height / downsample_factor, width / downsample_factor}.
  std::array<int64_t, 3> LatentShape(int width, int height) const;
};

// Applies a dtype override (Engine::Options::dtype) on top of a manifest's dtypes: "" changes
// nothing; one dtype name ("float16") sets every component; comma-separated component=dtype pairs
// ("generator=float16,decoder=bfloat16") set the components they name. INVALID_ARGUMENT naming
// the bad part, with `dtypes` unchanged. The sampling arithmetic stays float32 whatever the
// override.
absl::Status ApplyDTypeOverride(absl::string_view spec, ModelManifest::ComponentDTypes& dtypes);

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_MODEL_MANIFEST_H_
