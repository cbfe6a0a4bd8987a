#include "worker/pipeline.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <cmath>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "spdlog/spdlog.h"

namespace dmdserve {
namespace {

at::ScalarType ToScalarType(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return at::kFloat;
    case DType::kFloat16:
      return at::kHalf;
    case DType::kBFloat16:
      return at::kBFloat16;
  }
  return at::kFloat;
}

absl::string_view FirstLine(absl::string_view text) { return text.substr(0, text.find('\n')); }

// "[2, 77, ?]"; -1 stands for any size.
std::string ShapeString(const std::vector<int64_t>& shape) {
  std::vector<std::string> dims;
  for (const int64_t d : shape) dims.push_back(d == -1 ? "?" : absl::StrCat(d));
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

absl::Status ValidateIds(absl::Span<const int32_t> ids, int max_length, absl::string_view what) {
  if (ids.size() != static_cast<size_t>(max_length)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " has ", ids.size(), " token ids, expected ", max_length, " (tokenizer.max_length)"));
  }
  for (size_t j = 0; j < ids.size(); ++j) {
    if (ids[j] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, "[", j, "] is ", ids[j], ", expected a token id >= 0"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<c10::Device> ParseDevice(const std::string& name) {
  std::optional<c10::Device> device;
  try {
    device.emplace(name);
  } catch (const c10::Error&) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Pipeline::Options.device: \"", name, "\" is not a libtorch device (\"cpu\", \"cuda:N\")"));
  }
  if (device->is_cpu()) return *device;
  if (!device->is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat("Pipeline::Options.device: \"", name,
                                                   "\" is not supported (only cpu and cuda)"));
  }
  if (!torch::cuda::is_available()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Pipeline::Options.device: \"", name,
        "\" needs CUDA, which is not available (libtorch built without CUDA, or no GPU visible)"));
  }
  if (device->has_index() && device->index() >= static_cast<int>(torch::cuda::device_count())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Pipeline::Options.device: \"", name, "\" does not exist: ", torch::cuda::device_count(),
        " CUDA device(s) visible"));
  }
  return *device;
}

// Waits for the device's queued work (CUDA runs asynchronously), so that stage timings are real.
void Synchronize(const c10::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

absl::StatusOr<torch::jit::Module> LoadModule(const std::string& path, absl::string_view field,
                                              const c10::Device& device, at::ScalarType dtype) {
  std::string error;
  try {
    torch::jit::Module module = torch::jit::load(path, device);
    module.eval();
    if (dtype != at::kFloat) module.to(dtype);
    return module;
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    error = e.what();
  }
  return absl::InvalidArgumentError(absl::StrCat("components.", field, ": cannot load TorchScript ",
                                                 path, ": ", FirstLine(error)));
}

}  // namespace

struct Pipeline::State {
  ModelManifest manifest;
  c10::Device device;
  at::ScalarType generator_dtype;
  at::ScalarType decoder_dtype;
  // TorchScript methods are safe to run concurrently; forward() is merely not marked const.
  mutable torch::jit::Module text_encoder;
  mutable torch::jit::Module generator;
  mutable torch::jit::Module decoder;
  // Text embedding of the empty prompt, [1, L, D] in the generator's dtype on `device`; set only
  // when the manifest uses guidance.
  at::Tensor uncond_embedding;

  // Logs libtorch's `error` and returns an INTERNAL status that names `stage` but leaves the
  // error out: it can hold file paths and code.
  absl::Status Failed(absl::string_view stage, absl::string_view error) const;
  // INTERNAL unless `tensor` (output of `component`) has the `expected` shape (-1: any size).
  absl::Status CheckShape(absl::string_view component, const at::Tensor& tensor,
                          const std::vector<int64_t>& expected) const;
  // Runs `module` on `inputs` and returns its output (the first element of a tuple or list).
  absl::StatusOr<at::Tensor> Call(torch::jit::Module& module, absl::string_view component,
                                  std::vector<c10::IValue> inputs) const;

  // The stages of Run(), after validation. They may throw c10::Error from tensor operations.
  // The text encoder's output for `ids` ([rows, max_length] int64 on the CPU): [rows, L, D].
  absl::StatusOr<at::Tensor> EncodeText(const at::Tensor& ids) const;
  // The generator's text input for `batch`: [n, L, D], or [2n, L, D] = [uncond; cond] with
  // guidance. The text encoder runs once per distinct prompt, in order of first appearance.
  absl::StatusOr<at::Tensor> EmbedPrompts(absl::Span<const Input> batch) const;
  // The sampling loop: x0, float32 [n, C, h, w].
  absl::StatusOr<at::Tensor> Sample(absl::Span<const Input> batch, const at::Tensor& embedding,
                                    int width, int height) const;
  // Decodes x0 into uint8 HWC images.
  absl::StatusOr<std::vector<std::string>> Decode(const at::Tensor& x0, int width,
                                                  int height) const;
};

absl::Status Pipeline::State::Failed(absl::string_view stage, absl::string_view error) const {
  spdlog::error("model {}: {} failed: {}", manifest.name, std::string(stage), std::string(error));
  return absl::InternalError(absl::StrCat("model ", manifest.name, ": ", stage,
                                          " failed: libtorch error (details in the server log)"));
}

absl::Status Pipeline::State::CheckShape(absl::string_view component, const at::Tensor& tensor,
                                         const std::vector<int64_t>& expected) const {
  bool match = tensor.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; match && i < expected.size(); ++i) {
    match = expected[i] == -1 || expected[i] == tensor.size(i);
  }
  if (match) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("model ", manifest.name, ": ", component, " returned a tensor of shape ",
                   ShapeString(tensor.sizes().vec()), ", expected ", ShapeString(expected),
                   "; do model.json and the TorchScript files match?"));
}

absl::StatusOr<at::Tensor> Pipeline::State::Call(torch::jit::Module& module,
                                                 absl::string_view component,
                                                 std::vector<c10::IValue> inputs) const {
  c10::IValue output;
  try {
    output = module.forward(std::move(inputs));
  } catch (const c10::Error& e) {
    return Failed(component, e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Failed(component, e.what());
  }
  if (output.isTuple() && !output.toTupleRef().elements().empty()) {
    output = output.toTupleRef().elements()[0];
  } else if (output.isList() && !output.toListRef().empty()) {
    output = output.toListRef()[0];
  }
  if (!output.isTensor()) {
    return absl::InternalError(absl::StrCat("model ", manifest.name, ": ", component,
                                            " returned a ", output.tagKind(),
                                            ", expected a tensor"));
  }
  return output.toTensor();
}

absl::StatusOr<at::Tensor> Pipeline::State::EncodeText(const at::Tensor& ids) const {
  absl::StatusOr<at::Tensor> embedding = Call(text_encoder, "text_encoder", {ids.to(device)});
  if (!embedding.ok()) return embedding;
  absl::Status shape = CheckShape("text_encoder", *embedding, {ids.size(0), ids.size(1), -1});
  if (!shape.ok()) return shape;
  return embedding;
}

absl::StatusOr<at::Tensor> Pipeline::State::EmbedPrompts(absl::Span<const Input> batch) const {
  std::vector<size_t> distinct;  // index into `batch` of each distinct prompt
  std::vector<int64_t> rows;     // per image: its prompt's index in `distinct`
  std::vector<int64_t> ids;      // the distinct prompts' ids, row-major
  for (size_t i = 0; i < batch.size(); ++i) {
    size_t row = 0;
    while (row < distinct.size() && batch[distinct[row]].input_ids != batch[i].input_ids) ++row;
    if (row == distinct.size()) {
      distinct.push_back(i);
      ids.insert(ids.end(), batch[i].input_ids.begin(), batch[i].input_ids.end());
    }
    rows.push_back(static_cast<int64_t>(row));
  }
  absl::StatusOr<at::Tensor> encoded = EncodeText(
      at::tensor(ids, at::kLong)
          .reshape({static_cast<int64_t>(distinct.size()), manifest.tokenizer.max_length}));
  if (!encoded.ok()) return encoded;
  at::Tensor embedding =
      encoded->index_select(0, at::tensor(rows, at::kLong).to(device)).to(generator_dtype);
  if (!manifest.uses_guidance()) return embedding;
  const int64_t n = static_cast<int64_t>(batch.size());
  return at::cat({uncond_embedding.expand({n, -1, -1}), embedding});
}

absl::StatusOr<at::Tensor> Pipeline::State::Sample(absl::Span<const Input> batch,
                                                   const at::Tensor& embedding, int width,
                                                   int height) const {
  // Noise contract: one CPU generator per image, seeded with its seed, drawing its initial
  // latents and then any re-noise, in step order.
  std::vector<at::Generator> generators;
  for (const Input& input : batch) {
    generators.push_back(at::make_generator<at::CPUGeneratorImpl>(input.seed));
  }
  const std::array<int64_t, 3> latent_shape = manifest.LatentShape(width, height);
  auto noise = [&] {
    std::vector<at::Tensor> per_image;
    for (at::Generator& g : generators) {
      per_image.push_back(at::randn(latent_shape, g, at::kFloat));
    }
    return at::stack(per_image).to(device);
  };

  const bool guidance = manifest.uses_guidance();
  const std::vector<int>& timesteps = manifest.schedule.timesteps;
  const std::vector<double>& alphas = manifest.schedule.alphas_cumprod;
  at::Tensor z = noise();
  at::Tensor x0;
  for (size_t k = 0; k < timesteps.size(); ++k) {
    const double a = alphas[k];
    const at::Tensor z_in = guidance ? at::cat({z, z}) : z;
    const at::Tensor t_in =
        at::full({z_in.size(0)}, timesteps[k], at::TensorOptions(at::kLong).device(device));
    absl::StatusOr<at::Tensor> predicted =
        Call(generator, "generator", {z_in.to(generator_dtype), t_in, embedding});
    if (!predicted.ok()) return predicted;
    absl::Status shape = CheckShape("generator", *predicted, z_in.sizes().vec());
    if (!shape.ok()) return shape;
    at::Tensor pred = predicted->to(at::kFloat);
    if (guidance) {
      const std::vector<at::Tensor> halves = pred.chunk(2);
      pred = halves[0] + (halves[1] - halves[0]) * manifest.guidance_scale;
    }
    x0 = manifest.prediction_type == PredictionType::kEpsilon
             ? (z - pred * std::sqrt(1 - a)) / std::sqrt(a)
             : pred;
    if (k + 1 == timesteps.size()) break;
    const at::Tensor eps = manifest.schedule.step_mode == StepMode::kRenoise
                               ? noise()
                               : (z - x0 * std::sqrt(a)) / std::sqrt(1 - a);
    const double a_next = alphas[k + 1];
    z = x0 * std::sqrt(a_next) + eps * std::sqrt(1 - a_next);
  }
  return x0;
}

absl::StatusOr<std::vector<std::string>> Pipeline::State::Decode(const at::Tensor& x0, int width,
                                                                 int height) const {
  absl::StatusOr<at::Tensor> decoded =
      Call(decoder, "decoder", {(x0 / manifest.latent_scaling_factor).to(decoder_dtype)});
  if (!decoded.ok()) return decoded.status();
  const int64_t n = x0.size(0);
  absl::Status shape = CheckShape("decoder", *decoded, {n, manifest.channels, height, width});
  if (!shape.ok()) return shape;
  const at::Tensor pixels = ((decoded->to(at::kFloat) + 1) * 127.5)
                                .clamp(0, 255)
                                .round()
                                .to(at::kByte)
                                .permute({0, 2, 3, 1})
                                .contiguous()
                                .to(at::kCPU);
  const size_t image_bytes = static_cast<size_t>(height) * width * manifest.channels;
  const char* data = reinterpret_cast<const char*>(pixels.data_ptr<uint8_t>());
  std::vector<std::string> images;
  for (int64_t i = 0; i < n; ++i) images.emplace_back(data + i * image_bytes, image_bytes);
  return images;
}

Pipeline::Pipeline(std::unique_ptr<State> state) : state_(std::move(state)) {}

Pipeline::~Pipeline() = default;

absl::StatusOr<std::unique_ptr<Pipeline>> Pipeline::Create(const ModelManifest& manifest,
                                                           const Options& options) {
  if (options.intra_op_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Pipeline::Options.intra_op_threads must be >= 0, got ", options.intra_op_threads));
  }
  absl::StatusOr<c10::Device> device = ParseDevice(options.device);
  if (!device.ok()) return device.status();
  if (manifest.uses_guidance()) {
    absl::Status valid = ValidateIds(options.uncond_input_ids, manifest.tokenizer.max_length,
                                     "Pipeline::Options.uncond_input_ids (needed because "
                                     "guidance_scale > 1)");
    if (!valid.ok()) return valid;
  }
  if (options.intra_op_threads > 0) at::set_num_threads(options.intra_op_threads);

  const ModelManifest::Components& files = manifest.components;
  const ModelManifest::ComponentDTypes& dtypes = manifest.dtypes;
  absl::StatusOr<torch::jit::Module> text_encoder =
      LoadModule(files.text_encoder, "text_encoder", *device, ToScalarType(dtypes.text_encoder));
  if (!text_encoder.ok()) return text_encoder.status();
  absl::StatusOr<torch::jit::Module> generator =
      LoadModule(files.generator, "generator", *device, ToScalarType(dtypes.generator));
  if (!generator.ok()) return generator.status();
  absl::StatusOr<torch::jit::Module> decoder =
      LoadModule(files.decoder, "decoder", *device, ToScalarType(dtypes.decoder));
  if (!decoder.ok()) return decoder.status();

  auto state = std::unique_ptr<State>(new State{
      manifest, *device, ToScalarType(dtypes.generator), ToScalarType(dtypes.decoder),
      *std::move(text_encoder), *std::move(generator), *std::move(decoder), at::Tensor()});
  if (manifest.uses_guidance()) {
    try {
      c10::InferenceMode inference_mode;
      const std::vector<int64_t> ids(options.uncond_input_ids.begin(),
                                     options.uncond_input_ids.end());
      absl::StatusOr<at::Tensor> uncond =
          state->EncodeText(at::tensor(ids, at::kLong).reshape({1, -1}));
      if (!uncond.ok()) return uncond.status();
      state->uncond_embedding = uncond->to(state->generator_dtype);
    } catch (const c10::Error& e) {
      return state->Failed("empty-prompt embedding", e.what_without_backtrace());
    } catch (const std::exception& e) {
      return state->Failed("empty-prompt embedding", e.what());
    }
  }
  return std::unique_ptr<Pipeline>(new Pipeline(std::move(state)));
}

absl::StatusOr<Pipeline::Output> Pipeline::Run(absl::Span<const Input> batch, int width,
                                               int height) const {
  const ModelManifest& m = state_->manifest;
  if (batch.empty()) return absl::InvalidArgumentError("Pipeline::Run: empty batch");
  if (batch.size() > static_cast<size_t>(m.max_batch_size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("Pipeline::Run: batch of ", batch.size(), " images exceeds model ", m.name,
                     "'s largest batch size ", m.max_batch_size(), " (model.json batch_sizes)"));
  }
  if (!m.SupportsSize(width, height)) {
    return absl::InvalidArgumentError(absl::StrCat("Pipeline::Run: size ", width, "x", height,
                                                   " is not supported by model ", m.name,
                                                   " (supported: ", m.SupportedSizesText(), ")"));
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    absl::Status valid = ValidateIds(batch[i].input_ids, m.tokenizer.max_length,
                                     absl::StrCat("Pipeline::Run: batch[", i, "].input_ids"));
    if (!valid.ok()) return valid;
  }
  try {
    c10::InferenceMode inference_mode;
    const State& s = *state_;
    absl::Time start = absl::Now();
    // Time since the previous lap, once the device has finished the work queued so far.
    auto lap = [&] {
      Synchronize(s.device);
      const absl::Time now = absl::Now();
      const absl::Duration elapsed = now - start;
      start = now;
      return elapsed;
    };
    Output output;
    absl::StatusOr<at::Tensor> embedding = s.EmbedPrompts(batch);
    if (!embedding.ok()) return embedding.status();
    output.timings.text_encoder = lap();
    absl::StatusOr<at::Tensor> x0 = s.Sample(batch, *embedding, width, height);
    if (!x0.ok()) return x0.status();
    output.timings.generator = lap();
    absl::StatusOr<std::vector<std::string>> images = s.Decode(*x0, width, height);
    if (!images.ok()) return images.status();
    output.images = *std::move(images);
    output.timings.decoder = lap();
    return output;
  } catch (const c10::Error& e) {
    return state_->Failed("Run", e.what_without_backtrace());
  } catch (const std::exception& e) {
    return state_->Failed("Run", e.what());
  }
}

absl::Status Pipeline::Warmup() const {
  const ModelManifest& m = state_->manifest;
  for (const ModelManifest::Size& size : m.supported_sizes) {
    for (const int batch_size : m.batch_sizes) {
      // Distinct prompts, so that the text encoder also sees every batch size.
      std::vector<Input> batch(batch_size);
      for (int i = 0; i < batch_size; ++i) {
        batch[i].input_ids.assign(m.tokenizer.max_length, 0);
        batch[i].input_ids[0] = i;
        batch[i].seed = i;
      }
      absl::StatusOr<Output> output = Run(batch, size.width, size.height);
      if (!output.ok()) {
        return absl::Status(
            output.status().code(),
            absl::StrCat("warmup of model ", m.name, " at ", size.width, "x", size.height,
                         ", batch size ", batch_size, ": ", output.status().message()));
      }
    }
  }
  return absl::OkStatus();
}

const ModelManifest& Pipeline::manifest() const { return state_->manifest; }

}  // namespace dmdserve
