#include "worker/pipeline.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>
#include <torch/script.h>

#if DMDSERVE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "spdlog/spdlog.h"
#include "worker/device.h"
#include "worker/pipeline_internal.h"
#include "worker/postprocess.h"

namespace dmdserve {

using pipeline_internal::FirstLine;
using pipeline_internal::HostInputs;

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

// The libtorch device Options.device names, once it is known to exist.
absl::StatusOr<c10::Device> TorchDevice(const std::string& name) {
  const absl::StatusOr<DeviceId> id = ParseDevice(name);
  if (!id.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Pipeline::Options.device: ", id.status().message()));
  }
  if (!id->cuda) return c10::Device(c10::kCPU);
  if (!torch::cuda::is_available()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Pipeline::Options.device: \"", name,
        "\" needs CUDA, which is not available (libtorch built without CUDA, or no GPU visible)"));
  }
  if (id->index >= static_cast<int>(torch::cuda::device_count())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Pipeline::Options.device: \"", name, "\" does not exist: ", torch::cuda::device_count(),
        " CUDA device(s) visible"));
  }
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(id->index));
}

// Create's checks of `postprocess` on `device`.
absl::Status ValidatePostprocess(Pipeline::Postprocess postprocess, const c10::Device& device) {
  if (postprocess != Pipeline::Postprocess::kCudaKernel) return absl::OkStatus();
  if (!CudaBuild()) {
    return absl::FailedPreconditionError(
        "Pipeline::Options.postprocess: cuda_kernel needs a CUDA build (cmake "
        "-DDMDSERVE_CUDA=ON)");
  }
  if (!device.is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Pipeline::Options.postprocess: cuda_kernel needs a CUDA device, got ", device.str()));
  }
  return absl::OkStatus();
}

// Create's checks of `options` for `manifest`, in order; the device they name.
absl::StatusOr<c10::Device> ValidateOptions(const ModelManifest& manifest,
                                            const Pipeline::Options& options) {
  if (options.intra_op_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Pipeline::Options.intra_op_threads must be >= 0, got ", options.intra_op_threads));
  }
  if (options.instances < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("Pipeline::Options.instances must be >= 1, got ", options.instances));
  }
  absl::StatusOr<c10::Device> device = TorchDevice(options.device);
  if (!device.ok()) return device.status();
  if (absl::Status s = ValidatePostprocess(options.postprocess, *device); !s.ok()) return s;
  if (manifest.uses_guidance() && manifest.unconditional == Unconditional::kEmptyPrompt) {
    absl::Status valid = ValidateIds(options.uncond_input_ids, manifest.tokenizer.max_length,
                                     "Pipeline::Options.uncond_input_ids (needed because "
                                     "guidance_scale > 1)");
    if (!valid.ok()) return valid;
    if (manifest.tokenizer_2.has_value()) {
      valid = ValidateIds(options.uncond_input_ids_2, manifest.tokenizer.max_length,
                          "Pipeline::Options.uncond_input_ids_2 (needed because guidance_scale > "
                          "1 and the model has tokenizer_2)");
      if (!valid.ok()) return valid;
    }
  }
  return device;
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

// Stores `module`'s 4-d parameters (convolution weights) channels-last, in place.
void ToChannelsLast(torch::jit::Module& module) {
  torch::NoGradGuard no_grad;
  for (at::Tensor parameter : module.parameters()) {
    if (parameter.dim() == 4) {
      parameter.set_data(parameter.contiguous(at::MemoryFormat::ChannelsLast));
    }
  }
}

// Copies a host tensor to `device`; from pinned memory the copy is queued on the current stream
// and the call returns at once. A no-op for the CPU and for an undefined tensor.
at::Tensor ToDevice(const at::Tensor& host, const c10::Device& device) {
  if (!host.defined()) return host;
  return host.to(device, host.scalar_type(), /*non_blocking=*/true);
}

}  // namespace

Pipeline::Instance* Pipeline::State::Acquire() const {
  absl::MutexLock lock(&instances_mu);
  instances_mu.Await(absl::Condition(
      +[](std::vector<Instance*>* free) { return !free->empty(); }, &free_instances));
  Instance* instance = free_instances.back();
  free_instances.pop_back();
  return instance;
}

void Pipeline::State::Release(Instance* instance) const {
  absl::MutexLock lock(&instances_mu);
  free_instances.push_back(instance);
}

void Pipeline::State::Synchronize(const Instance& instance) const {
#if DMDSERVE_WITH_CUDA
  if (instance.stream.has_value()) {
    instance.stream->synchronize();
    return;
  }
#endif
  // A build without DMDSERVE_CUDA on a CUDA libtorch runs on the default stream: wait for all.
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

absl::Status Pipeline::State::Failed(absl::string_view stage, absl::string_view error) const {
  if (IsOutOfMemoryError(error)) {
    spdlog::warn("model {}: {} ran out of memory on {}: {}", manifest.name, std::string(stage),
                 device_name, std::string(error));
    return absl::ResourceExhaustedError(
        absl::StrCat("model ", manifest.name, ": ", stage, " ran out of memory on ", device_name));
  }
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

absl::StatusOr<c10::IValue> Pipeline::State::Invoke(torch::jit::Module& module,
                                                    absl::string_view component,
                                                    std::vector<c10::IValue> inputs) const {
  try {
    return module.forward(std::move(inputs));
  } catch (const c10::Error& e) {
    return Failed(component, e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Failed(component, e.what());
  }
}

absl::StatusOr<at::Tensor> Pipeline::State::Call(torch::jit::Module& module,
                                                 absl::string_view component,
                                                 std::vector<c10::IValue> inputs) const {
  absl::StatusOr<c10::IValue> invoked = Invoke(module, component, std::move(inputs));
  if (!invoked.ok()) return invoked.status();
  c10::IValue output = *std::move(invoked);
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

absl::StatusOr<std::vector<at::Tensor>> Pipeline::State::CallForTuple(
    torch::jit::Module& module, absl::string_view component, std::vector<c10::IValue> inputs,
    size_t count) const {
  absl::StatusOr<c10::IValue> output = Invoke(module, component, std::move(inputs));
  if (!output.ok()) return output.status();
  std::vector<at::Tensor> tensors;
  bool all_tensors = output->isTuple();
  if (all_tensors) {
    for (const c10::IValue& element : output->toTupleRef().elements()) {
      all_tensors = all_tensors && element.isTensor();
      if (all_tensors) tensors.push_back(element.toTensor());
    }
  }
  if (!all_tensors || tensors.size() != count) {
    return absl::InternalError(absl::StrCat("model ", manifest.name, ": ", component,
                                            " returned a ", output->tagKind(), ", expected a tuple",
                                            " of ", count, " tensors"));
  }
  return tensors;
}

HostInputs Pipeline::State::StageInputs(absl::Span<const Input> batch, int64_t run_size, bool dedup,
                                        int width, int height) const {
  const int64_t n = static_cast<int64_t>(batch.size());
  auto input = [&](int64_t i) -> const Input& { return batch[std::min(i, n - 1)]; };
  auto same_prompt = [](const Input& a, const Input& b) {
    return a.input_ids == b.input_ids && a.input_ids_2 == b.input_ids_2;
  };
  std::vector<int64_t> first;  // per ids row: the first image with that prompt
  std::vector<int64_t> rows;   // per image: its ids row
  for (int64_t i = 0; i < run_size; ++i) {
    size_t row = 0;
    while (dedup && row < first.size() && !same_prompt(input(first[row]), input(i))) ++row;
    if (!dedup || row == first.size()) {
      row = first.size();
      first.push_back(i);
    }
    rows.push_back(static_cast<int64_t>(row));
  }
  const bool pinned = device.is_cuda();
  auto host = [pinned](at::ScalarType type) {
    return at::TensorOptions(type).pinned_memory(pinned);
  };
  const int64_t max_length = manifest.tokenizer.max_length;
  HostInputs inputs;
  const bool second = manifest.tokenizer_2.has_value();
  inputs.ids = at::empty({static_cast<int64_t>(first.size()), max_length}, host(at::kLong));
  if (second) inputs.ids_2 = at::empty_like(inputs.ids);
  for (size_t r = 0; r < first.size(); ++r) {
    const Input& prompt = input(first[r]);
    std::copy(prompt.input_ids.begin(), prompt.input_ids.end(),
              inputs.ids.data_ptr<int64_t>() + r * max_length);
    if (second) {
      std::copy(prompt.input_ids_2.begin(), prompt.input_ids_2.end(),
                inputs.ids_2.data_ptr<int64_t>() + r * max_length);
    }
  }
  if (dedup) {
    inputs.rows = at::empty({run_size}, host(at::kLong));
    std::copy(rows.begin(), rows.end(), inputs.rows.data_ptr<int64_t>());
  }
  const std::array<int64_t, 3> latent = manifest.LatentShape(width, height);
  const int64_t draws =
      manifest.schedule.step_mode == StepMode::kRenoise ? manifest.steps() : int64_t{1};
  inputs.noise = at::empty({run_size, draws, latent[0], latent[1], latent[2]}, host(at::kFloat));
  for (int64_t i = 0; i < n; ++i) {
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(batch[i].seed);
    for (int64_t d = 0; d < draws; ++d) {
      inputs.noise[i][d].copy_(at::randn(latent, generator, at::kFloat));
    }
  }
  for (int64_t i = n; i < run_size; ++i) inputs.noise[i].copy_(inputs.noise[n - 1]);
  return inputs;
}

absl::StatusOr<Pipeline::State::TextEmbedding> Pipeline::State::EncodeText(
    const at::Tensor& ids, const at::Tensor& ids_2) const {
  std::vector<c10::IValue> inputs = {ids};
  if (manifest.tokenizer_2.has_value()) inputs.push_back(ids_2);
  TextEmbedding embedding;
  const int64_t rows = ids.size(0);
  if (manifest.conditioning == Conditioning::kText) {
    absl::StatusOr<at::Tensor> hidden = Call(text_encoder, "text_encoder", std::move(inputs));
    if (!hidden.ok()) return hidden.status();
    embedding.hidden = *std::move(hidden);
  } else {
    absl::StatusOr<std::vector<at::Tensor>> outputs =
        CallForTuple(text_encoder, "text_encoder", std::move(inputs), 2);
    if (!outputs.ok()) return outputs.status();
    embedding.hidden = (*outputs)[0];
    embedding.pooled = (*outputs)[1];
    absl::Status shape = CheckShape("text_encoder (pooled)", embedding.pooled, {rows, -1});
    if (!shape.ok()) return shape;
  }
  absl::Status shape = CheckShape("text_encoder", embedding.hidden, {rows, ids.size(1), -1});
  if (!shape.ok()) return shape;
  return embedding;
}

absl::StatusOr<Pipeline::State::TextEmbedding> Pipeline::State::EmbedPrompts(
    const at::Tensor& ids, const at::Tensor& ids_2, const at::Tensor& rows) const {
  absl::StatusOr<TextEmbedding> encoded = EncodeText(ids, ids_2);
  if (!encoded.ok()) return encoded;
  // Each image's row, in the generator's dtype.
  auto per_image = [&rows, this](const at::Tensor& t) {
    return t.defined() ? (rows.defined() ? t.index_select(0, rows) : t).to(generator_dtype) : t;
  };
  TextEmbedding cond{per_image(encoded->hidden), per_image(encoded->pooled)};
  if (!manifest.uses_guidance()) return cond;
  // [uncond; cond]: the empty prompt's embedding, or zeros.
  auto with_uncond = [this](const at::Tensor& c, const at::Tensor& uncond) {
    if (!c.defined()) return c;
    const at::Tensor u = manifest.unconditional == Unconditional::kZeros
                             ? at::zeros_like(c)
                             : uncond.expand(c.sizes());
    return at::cat({u, c});
  };
  return TextEmbedding{with_uncond(cond.hidden, uncond_embedding.hidden),
                       with_uncond(cond.pooled, uncond_embedding.pooled)};
}

at::Tensor Pipeline::State::TimeIds(int64_t rows, int width, int height) const {
  // original size (H, W), crop top-left (0, 0), target size (H, W); filled on the device, so
  // that a CUDA graph can capture it.
  at::Tensor time_ids = at::zeros({rows, 6}, at::TensorOptions(generator_dtype).device(device));
  for (const int column : {0, 4}) time_ids.select(1, column).fill_(height);
  for (const int column : {1, 5}) time_ids.select(1, column).fill_(width);
  return time_ids;
}

absl::StatusOr<at::Tensor> Pipeline::State::Predict(const at::Tensor& z, int t,
                                                    const TextEmbedding& embedding,
                                                    const at::Tensor& time_ids) const {
  const at::Tensor t_in = at::full({z.size(0)}, t, at::TensorOptions(at::kLong).device(device));
  std::vector<c10::IValue> inputs = {z.to(generator_dtype), t_in, embedding.hidden};
  if (manifest.conditioning == Conditioning::kTextTime) {
    inputs.push_back(embedding.pooled);
    inputs.push_back(time_ids);
  }
  absl::StatusOr<at::Tensor> predicted = Call(generator, "generator", std::move(inputs));
  if (!predicted.ok()) return predicted;
  absl::Status shape = CheckShape("generator", *predicted, z.sizes().vec());
  if (!shape.ok()) return shape;
  return predicted->to(at::kFloat);
}

absl::StatusOr<at::Tensor> Pipeline::State::Sample(const at::Tensor& noise,
                                                   const TextEmbedding& embedding, int width,
                                                   int height) const {
  const bool guidance = manifest.uses_guidance();
  const std::vector<int>& timesteps = manifest.schedule.timesteps;
  const std::vector<double>& alphas = manifest.schedule.alphas_cumprod;
  const at::Tensor time_ids = manifest.conditioning == Conditioning::kTextTime
                                  ? TimeIds(embedding.hidden.size(0), width, height)
                                  : at::Tensor();
  int64_t draw = 0;
  at::Tensor z = noise.select(1, draw++).contiguous();
  if (manifest.schedule.initial_noise_scale != 1.0) z = z * manifest.schedule.initial_noise_scale;
  at::Tensor x0;
  for (size_t k = 0; k < timesteps.size(); ++k) {
    const double a = alphas[k];
    absl::StatusOr<at::Tensor> predicted =
        Predict(guidance ? at::cat({z, z}) : z, timesteps[k], embedding, time_ids);
    if (!predicted.ok()) return predicted;
    at::Tensor pred = *std::move(predicted);
    if (guidance) {
      const std::vector<at::Tensor> halves = pred.chunk(2);
      pred = halves[0] + (halves[1] - halves[0]) * manifest.guidance_scale;
    }
    // Float32 whatever the components' dtypes: one-step x0 amplifies errors in pred ~15x.
    x0 = manifest.prediction_type == PredictionType::kEpsilon
             ? (z - pred * std::sqrt(1 - a)) / std::sqrt(a)
             : pred;
    if (k + 1 == timesteps.size()) break;
    const at::Tensor eps = manifest.schedule.step_mode == StepMode::kRenoise
                               ? noise.select(1, draw++)
                               : (z - x0 * std::sqrt(a)) / std::sqrt(1 - a);
    const double a_next = alphas[k + 1];
    z = x0 * std::sqrt(a_next) + eps * std::sqrt(1 - a_next);
  }
  return x0;
}

absl::StatusOr<at::Tensor> Pipeline::State::Decode(const at::Tensor& x0, int width,
                                                   int height) const {
  absl::StatusOr<at::Tensor> decoded =
      Call(decoder, "decoder", {(x0 / manifest.latent_scaling_factor).to(decoder_dtype)});
  if (!decoded.ok()) return decoded;
  absl::Status shape =
      CheckShape("decoder", *decoded, {x0.size(0), manifest.channels, height, width});
  if (!shape.ok()) return shape;
#if DMDSERVE_WITH_CUDA
  if (postprocess == Postprocess::kCudaKernel) return ToUint8NhwcCuda(*decoded);
#endif
  return ToUint8NhwcTorch(*decoded);
}

std::vector<std::string> Pipeline::State::CopyOut(const Instance& instance,
                                                  const at::Tensor& pixels, int64_t n) const {
  at::Tensor host = pixels;
  if (pixels.is_cuda()) {
    host = at::empty(pixels.sizes(), at::TensorOptions(at::kByte).pinned_memory(true));
    host.copy_(pixels, /*non_blocking=*/true);
    Synchronize(instance);
  }
  const size_t image_bytes = static_cast<size_t>(host[0].numel());
  const char* data = reinterpret_cast<const char*>(host.data_ptr<uint8_t>());
  std::vector<std::string> images;
  for (int64_t i = 0; i < n; ++i) images.emplace_back(data + i * image_bytes, image_bytes);
  return images;
}

absl::StatusOr<Pipeline::Output> Pipeline::State::RunEager(const Instance& instance,
                                                           absl::Span<const Input> batch, int width,
                                                           int height) const {
  const absl::Time begin = absl::Now();
  absl::Time start = begin;
  // Time since the previous lap, once the device has finished the work queued so far.
  auto lap = [&] {
    Synchronize(instance);
    const absl::Time now = absl::Now();
    const absl::Duration elapsed = now - start;
    start = now;
    return elapsed;
  };
  const int64_t n = static_cast<int64_t>(batch.size());
  Output output;
  output.run_batch_size = static_cast<int>(n);
  const HostInputs host = StageInputs(batch, n, /*dedup=*/true, width, height);
  absl::StatusOr<TextEmbedding> embedding = EmbedPrompts(
      ToDevice(host.ids, device), ToDevice(host.ids_2, device), ToDevice(host.rows, device));
  if (!embedding.ok()) return embedding.status();
  output.timings.text_encoder = lap();
  absl::StatusOr<at::Tensor> x0 = Sample(ToDevice(host.noise, device), *embedding, width, height);
  if (!x0.ok()) return x0.status();
  output.timings.generator = lap();
  absl::StatusOr<at::Tensor> pixels = Decode(*x0, width, height);
  if (!pixels.ok()) return pixels.status();
  output.images = CopyOut(instance, *pixels, n);
  output.timings.decoder = lap();
  output.timings.total = absl::Now() - begin;
  return output;
}


Pipeline::Pipeline(std::unique_ptr<State> state) : state_(std::move(state)) {}

Pipeline::~Pipeline() = default;

absl::StatusOr<Pipeline::Postprocess> Pipeline::ParsePostprocess(absl::string_view name) {
  if (name == "torch") return Postprocess::kTorchOps;
  if (name == "cuda_kernel") return Postprocess::kCudaKernel;
  return absl::InvalidArgumentError(
      absl::StrCat("postprocess: \"", name, "\" is neither \"torch\" nor \"cuda_kernel\""));
}

absl::StatusOr<std::unique_ptr<Pipeline>> Pipeline::Create(const ModelManifest& manifest,
                                                           const Options& options) {
  absl::StatusOr<c10::Device> device = ValidateOptions(manifest, options);
  if (!device.ok()) return device.status();
  if (options.intra_op_threads > 0) at::set_num_threads(options.intra_op_threads);

  auto state = std::make_unique<State>();
  state->manifest = manifest;
  state->device = *device;
  state->device_name = device->str();
  state->generator_dtype = ToScalarType(manifest.dtypes.generator);
  state->decoder_dtype = ToScalarType(manifest.dtypes.decoder);
  state->postprocess = options.postprocess;
  state->cuda_graphs = options.cuda_graphs && device->is_cuda();
  state->channels_last_decoder = options.channels_last_decoder && device->is_cpu();
  if (absl::Status s = state->LoadComponents(); !s.ok()) return s;
  state->AddInstances(options.instances);
  if (absl::Status s = state->EmbedEmptyPrompt(options); !s.ok()) return s;
  return std::unique_ptr<Pipeline>(new Pipeline(std::move(state)));
}

absl::Status Pipeline::State::LoadComponents() {
  const ModelManifest::Components& files = manifest.components;
  absl::StatusOr<torch::jit::Module> loaded = LoadModule(
      files.text_encoder, "text_encoder", device, ToScalarType(manifest.dtypes.text_encoder));
  if (!loaded.ok()) return loaded.status();
  text_encoder = *std::move(loaded);
  loaded = LoadModule(files.generator, "generator", device, generator_dtype);
  if (!loaded.ok()) return loaded.status();
  generator = *std::move(loaded);
  loaded = LoadModule(files.decoder, "decoder", device, decoder_dtype);
  if (!loaded.ok()) return loaded.status();
  decoder = *std::move(loaded);
  if (channels_last_decoder) ToChannelsLast(decoder);
  return absl::OkStatus();
}

void Pipeline::State::AddInstances(int count) {
  for (int i = 0; i < count; ++i) {
    auto instance = std::make_unique<Instance>();
#if DMDSERVE_WITH_CUDA
    if (device.is_cuda()) {
      instance->stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index());
      instance->graph_pool = at::cuda::graph_pool_handle();
    }
#endif
    absl::MutexLock lock(&instances_mu);
    free_instances.push_back(instance.get());
    instances.push_back(std::move(instance));
  }
}

absl::Status Pipeline::State::EmbedEmptyPrompt(const Options& options) {
  auto ids_tensor = [this](const std::vector<int32_t>& ids) {
    if (ids.empty()) return at::Tensor();
    const std::vector<int64_t> ids64(ids.begin(), ids.end());
    return at::tensor(ids64, at::kLong).reshape({1, -1}).to(device);
  };
  try {
    if (manifest.uses_guidance() && manifest.unconditional == Unconditional::kEmptyPrompt) {
      c10::InferenceMode inference_mode;
      absl::StatusOr<TextEmbedding> uncond =
          EncodeText(ids_tensor(options.uncond_input_ids), ids_tensor(options.uncond_input_ids_2));
      if (!uncond.ok()) return uncond.status();
      uncond_embedding.hidden = uncond->hidden.to(generator_dtype);
      if (uncond->pooled.defined()) uncond_embedding.pooled = uncond->pooled.to(generator_dtype);
    }
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
  } catch (const c10::Error& e) {
    return Failed("empty-prompt embedding", e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Failed("empty-prompt embedding", e.what());
  }
  return absl::OkStatus();
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
  const int size_index = m.SizeIndex(width, height);
  if (size_index < 0) {
    return absl::InvalidArgumentError(absl::StrCat("Pipeline::Run: size ", width, "x", height,
                                                   " is not supported by model ", m.name,
                                                   " (supported: ", m.SupportedSizesText(), ")"));
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    absl::Status valid = ValidateIds(batch[i].input_ids, m.tokenizer.max_length,
                                     absl::StrCat("Pipeline::Run: batch[", i, "].input_ids"));
    if (valid.ok() && m.tokenizer_2.has_value()) {
      valid = ValidateIds(batch[i].input_ids_2, m.tokenizer.max_length,
                          absl::StrCat("Pipeline::Run: batch[", i, "].input_ids_2"));
    } else if (valid.ok() && !batch[i].input_ids_2.empty()) {
      valid = absl::InvalidArgumentError(
          absl::StrCat("Pipeline::Run: batch[", i, "].input_ids_2 must be empty: model ", m.name,
                       " has one tokenizer"));
    }
    if (!valid.ok()) return valid;
  }
  const State& s = *state_;
  Instance* instance = s.Acquire();
  absl::StatusOr<Output> output = [&]() -> absl::StatusOr<Output> {
    try {
      c10::InferenceMode inference_mode;
#if DMDSERVE_WITH_CUDA
      std::optional<c10::cuda::CUDAStreamGuard> stream_guard;
      if (instance->stream.has_value()) stream_guard.emplace(*instance->stream);
      if (State::CapturedGraph* graph =
              s.GraphFor(*instance, size_index, static_cast<int>(batch.size()));
          graph != nullptr) {
        return s.Replay(*instance, *graph, batch);
      }
#endif
      return s.RunEager(*instance, batch, width, height);
    } catch (const c10::Error& e) {
      return s.Failed("Run", e.what_without_backtrace());
    } catch (const std::exception& e) {
      return s.Failed("Run", e.what());
    }
  }();
  s.Release(instance);
  // The failed batch's tensors are freed by now: hand the cached blocks back to the driver.
  if (output.status().code() == absl::StatusCode::kResourceExhausted) {
    ReleaseCachedMemory(s.device_name);
  }
  return output;
}

std::vector<Pipeline::Input> Pipeline::SyntheticBatch(const ModelManifest& manifest,
                                                     int batch_size) {
  std::vector<Input> batch(batch_size);
  for (int i = 0; i < batch_size; ++i) {
    batch[i].input_ids.assign(manifest.tokenizer.max_length, 0);
    batch[i].input_ids[0] = i;
    if (manifest.tokenizer_2.has_value()) batch[i].input_ids_2 = batch[i].input_ids;
    batch[i].seed = i;
  }
  return batch;
}

absl::Status Pipeline::Warmup() const {
  const ModelManifest& m = state_->manifest;
  for (const ModelManifest::Size& size : m.supported_sizes) {
    for (const int batch_size : m.batch_sizes) {
      absl::StatusOr<Output> output = Run(SyntheticBatch(m, batch_size), size.width, size.height);
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

absl::StatusOr<int> Pipeline::CaptureGraphs() {
#if DMDSERVE_WITH_CUDA
  return state_->CaptureAllGraphs();  // pipeline_cuda_graphs.cc
#else
  return 0;
#endif
}

const ModelManifest& Pipeline::manifest() const { return state_->manifest; }

const std::string& Pipeline::device() const { return state_->device_name; }

}  // namespace dmdserve
