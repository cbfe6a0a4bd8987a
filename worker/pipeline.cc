#include "worker/pipeline.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>
#include <torch/script.h>

#if DMDSERVE_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "spdlog/spdlog.h"
#include "worker/device.h"
#include "worker/postprocess.h"

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
  if (device->is_cpu()) return c10::Device(c10::kCPU);
  if (!device->is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat("Pipeline::Options.device: \"", name,
                                                   "\" is not supported (only cpu and cuda)"));
  }
  if (!torch::cuda::is_available()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Pipeline::Options.device: \"", name,
        "\" needs CUDA, which is not available (libtorch built without CUDA, or no GPU visible)"));
  }
  if (!device->has_index()) device.emplace(c10::kCUDA, 0);
  if (device->index() >= static_cast<int>(torch::cuda::device_count())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Pipeline::Options.device: \"", name, "\" does not exist: ", torch::cuda::device_count(),
        " CUDA device(s) visible"));
  }
  return *device;
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

// Copies a host tensor to `device`; from pinned memory the copy is queued on the current stream
// and the call returns at once. A no-op for the CPU.
at::Tensor ToDevice(const at::Tensor& host, const c10::Device& device) {
  return host.to(device, host.scalar_type(), /*non_blocking=*/true);
}

// A batch's inputs in host memory (pinned for a CUDA device), one copy each from the device.
struct HostInputs {
  at::Tensor ids;    // [rows, L] int64: one row per distinct prompt, or one per image
  at::Tensor rows;   // [n] int64: each image's row in `ids`; undefined when one row per image
  at::Tensor noise;  // [n, draws, C, h, w] float32: every draw of each image's noise generator
};

#if DMDSERVE_WITH_CUDA
// A CUDA graph of the whole pipeline at one size and batch size, with its static tensors: Replay
// copies a batch's inputs into `ids` and `noise` and reads the images from `pixels`.
struct CapturedGraph {
  int batch_size = 0;
  at::cuda::CUDAGraph graph;
  at::Tensor ids;     // [batch_size, L] int64, one row per image
  at::Tensor noise;   // [batch_size, draws, C, h, w] float32
  at::Tensor pixels;  // [batch_size, H, W, channels] uint8
};
#endif

}  // namespace

// What one Run() needs to itself (see the class comment). Taken from State::free_instances.
struct Pipeline::Instance {
#if DMDSERVE_WITH_CUDA
  // CUDA devices only: the stream all of this instance's work runs on, the memory pool its graphs
  // share (they never run concurrently), and the graphs by (size index, batch size).
  std::optional<c10::cuda::CUDAStream> stream;
  decltype(at::cuda::graph_pool_handle()) graph_pool{};
  std::map<std::pair<int, int>, std::unique_ptr<CapturedGraph>> graphs;
#endif
};

struct Pipeline::State {
  ModelManifest manifest;
  c10::Device device{c10::kCPU};
  std::string device_name;  // "cpu", "cuda:N"
  at::ScalarType generator_dtype = at::kFloat;
  at::ScalarType decoder_dtype = at::kFloat;
  Postprocess postprocess = Postprocess::kTorchOps;
  bool cuda_graphs = false;
  // TorchScript methods are safe to run concurrently; forward() is merely not marked const.
  mutable torch::jit::Module text_encoder;
  mutable torch::jit::Module generator;
  mutable torch::jit::Module decoder;
  // Text embedding of the empty prompt, [1, L, D] in the generator's dtype on `device`; set only
  // when the manifest uses guidance.
  at::Tensor uncond_embedding;
  std::vector<std::unique_ptr<Instance>> instances;
  mutable absl::Mutex instances_mu;
  mutable std::vector<Instance*> free_instances ABSL_GUARDED_BY(instances_mu);

  // Waits for a free instance and takes it; Release gives it back.
  Instance* Acquire() const;
  void Release(Instance* instance) const;
  // Waits for the device work `instance` has queued (CUDA runs asynchronously). No-op on the CPU.
  void Synchronize(const Instance& instance) const;

  // Logs libtorch's `error` and returns a status that names `stage` but leaves the error out (it
  // can hold file paths and code): RESOURCE_EXHAUSTED when memory ran out, else INTERNAL.
  absl::Status Failed(absl::string_view stage, absl::string_view error) const;
  // INTERNAL unless `tensor` (output of `component`) has the `expected` shape (-1: any size).
  absl::Status CheckShape(absl::string_view component, const at::Tensor& tensor,
                          const std::vector<int64_t>& expected) const;
  // Runs `module` on `inputs` and returns its output (the first element of a tuple or list).
  absl::StatusOr<at::Tensor> Call(torch::jit::Module& module, absl::string_view component,
                                  std::vector<c10::IValue> inputs) const;

  // The stages of Run(), after validation. They may throw c10::Error from tensor operations.
  // `batch` padded to `run_size` images (repeating its last input) in host memory: with `dedup`,
  // one ids row per distinct prompt in order of first appearance, else one per image. Noise
  // contract: one CPU generator per image seeded with its seed, drawing the initial latents and
  // then each re-noise step's noise, in step order.
  HostInputs StageInputs(absl::Span<const Input> batch, int64_t run_size, bool dedup, int width,
                         int height) const;
  // The text encoder's output for `ids` ([rows, max_length] int64 on the device): [rows, L, D].
  absl::StatusOr<at::Tensor> EncodeText(const at::Tensor& ids) const;
  // The generator's text input: [n, L, D], or [2n, L, D] = [uncond; cond] with guidance. `rows`
  // (on the device) picks each image's row of the encoded `ids`; undefined: row i for image i.
  absl::StatusOr<at::Tensor> EmbedPrompts(const at::Tensor& ids, const at::Tensor& rows) const;
  // The sampling loop on `noise` (HostInputs::noise on the device): x0, float32 [n, C, h, w].
  absl::StatusOr<at::Tensor> Sample(const at::Tensor& noise, const at::Tensor& embedding) const;
  // Decodes x0 into uint8 NHWC pixels on the device.
  absl::StatusOr<at::Tensor> Decode(const at::Tensor& x0, int width, int height) const;
  // The first `n` images of `pixels`, brought to host memory (one copy from a GPU).
  std::vector<std::string> CopyOut(const Instance& instance, const at::Tensor& pixels,
                                   int64_t n) const;
  // Run() without a CUDA graph, on the current stream.
  absl::StatusOr<Output> RunEager(const Instance& instance, absl::Span<const Input> batch,
                                  int width, int height) const;
#if DMDSERVE_WITH_CUDA
  // The graph a batch of `n` images at `size_index` replays: the one captured for the smallest
  // manifest batch size >= n, if its capture succeeded.
  CapturedGraph* GraphFor(Instance& instance, int size_index, int n) const;
  absl::StatusOr<Output> Replay(const Instance& instance, CapturedGraph& graph,
                                absl::Span<const Input> batch) const;
  // Captures `instance`'s graph for one shape; false (logged) when capture failed.
  absl::StatusOr<bool> Capture(Instance& instance, int size_index, int batch_size);
#endif
};

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

HostInputs Pipeline::State::StageInputs(absl::Span<const Input> batch, int64_t run_size, bool dedup,
                                        int width, int height) const {
  const int64_t n = static_cast<int64_t>(batch.size());
  auto input = [&](int64_t i) -> const Input& { return batch[std::min(i, n - 1)]; };
  std::vector<int64_t> first;  // per ids row: the first image with that prompt
  std::vector<int64_t> rows;   // per image: its ids row
  for (int64_t i = 0; i < run_size; ++i) {
    size_t row = 0;
    while (dedup && row < first.size() && input(first[row]).input_ids != input(i).input_ids) ++row;
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
  inputs.ids = at::empty({static_cast<int64_t>(first.size()), max_length}, host(at::kLong));
  int64_t* ids = inputs.ids.data_ptr<int64_t>();
  for (size_t r = 0; r < first.size(); ++r) {
    const std::vector<int32_t>& prompt = input(first[r]).input_ids;
    std::copy(prompt.begin(), prompt.end(), ids + r * max_length);
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

absl::StatusOr<at::Tensor> Pipeline::State::EncodeText(const at::Tensor& ids) const {
  absl::StatusOr<at::Tensor> embedding = Call(text_encoder, "text_encoder", {ids});
  if (!embedding.ok()) return embedding;
  absl::Status shape = CheckShape("text_encoder", *embedding, {ids.size(0), ids.size(1), -1});
  if (!shape.ok()) return shape;
  return embedding;
}

absl::StatusOr<at::Tensor> Pipeline::State::EmbedPrompts(const at::Tensor& ids,
                                                         const at::Tensor& rows) const {
  absl::StatusOr<at::Tensor> encoded = EncodeText(ids);
  if (!encoded.ok()) return encoded;
  const at::Tensor embedding =
      (rows.defined() ? encoded->index_select(0, rows) : *encoded).to(generator_dtype);
  if (!manifest.uses_guidance()) return embedding;
  return at::cat({uncond_embedding.expand({embedding.size(0), -1, -1}), embedding});
}

absl::StatusOr<at::Tensor> Pipeline::State::Sample(const at::Tensor& noise,
                                                   const at::Tensor& embedding) const {
  const bool guidance = manifest.uses_guidance();
  const std::vector<int>& timesteps = manifest.schedule.timesteps;
  const std::vector<double>& alphas = manifest.schedule.alphas_cumprod;
  int64_t draw = 0;
  at::Tensor z = noise.select(1, draw++).contiguous();
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
  absl::StatusOr<at::Tensor> embedding =
      EmbedPrompts(ToDevice(host.ids, device), ToDevice(host.rows, device));
  if (!embedding.ok()) return embedding.status();
  output.timings.text_encoder = lap();
  absl::StatusOr<at::Tensor> x0 = Sample(ToDevice(host.noise, device), *embedding);
  if (!x0.ok()) return x0.status();
  output.timings.generator = lap();
  absl::StatusOr<at::Tensor> pixels = Decode(*x0, width, height);
  if (!pixels.ok()) return pixels.status();
  output.images = CopyOut(instance, *pixels, n);
  output.timings.decoder = lap();
  output.timings.total = absl::Now() - begin;
  return output;
}

#if DMDSERVE_WITH_CUDA
CapturedGraph* Pipeline::State::GraphFor(Instance& instance, int size_index, int n) const {
  const std::vector<int>& sizes = manifest.batch_sizes;
  const auto batch_size = std::lower_bound(sizes.begin(), sizes.end(), n);
  if (batch_size == sizes.end()) return nullptr;
  const auto it = instance.graphs.find({size_index, *batch_size});
  return it == instance.graphs.end() ? nullptr : it->second.get();
}

absl::StatusOr<Pipeline::Output> Pipeline::State::Replay(const Instance& instance,
                                                         CapturedGraph& graph,
                                                         absl::Span<const Input> batch) const {
  const absl::Time begin = absl::Now();
  const HostInputs host =
      StageInputs(batch, graph.batch_size, /*dedup=*/false, static_cast<int>(graph.pixels.size(2)),
                  static_cast<int>(graph.pixels.size(1)));
  graph.ids.copy_(host.ids, /*non_blocking=*/true);
  graph.noise.copy_(host.noise, /*non_blocking=*/true);
  graph.graph.replay();
  Output output;
  output.images = CopyOut(instance, graph.pixels, static_cast<int64_t>(batch.size()));
  output.run_batch_size = graph.batch_size;
  output.cuda_graph = true;
  output.timings.total = absl::Now() - begin;
  return output;
}

absl::StatusOr<bool> Pipeline::State::Capture(Instance& instance, int size_index, int batch_size) {
  const ModelManifest::Size size = manifest.supported_sizes[size_index];
  const std::string shape =
      absl::StrCat(size.width, "x", size.height, ", batch size ", batch_size, " on ", device_name);
  c10::InferenceMode inference_mode;
  const c10::cuda::CUDAStreamGuard stream_guard(*instance.stream);
  // Static inputs, allocated outside the graph's pool: distinct prompts and random noise.
  const std::array<int64_t, 3> latent = manifest.LatentShape(size.width, size.height);
  const int64_t draws =
      manifest.schedule.step_mode == StepMode::kRenoise ? manifest.steps() : int64_t{1};
  auto graph = std::make_unique<CapturedGraph>();
  graph->batch_size = batch_size;
  graph->ids = at::zeros({batch_size, manifest.tokenizer.max_length},
                         at::TensorOptions(at::kLong).device(device));
  graph->ids.select(1, 0).copy_(at::arange(batch_size, at::TensorOptions(at::kLong)));
  graph->noise = at::randn({batch_size, draws, latent[0], latent[1], latent[2]},
                           at::TensorOptions(at::kFloat).device(device));
  auto forward = [&]() -> absl::StatusOr<at::Tensor> {
    absl::StatusOr<at::Tensor> embedding = EmbedPrompts(graph->ids, at::Tensor());
    if (!embedding.ok()) return embedding;
    absl::StatusOr<at::Tensor> x0 = Sample(graph->noise, *embedding);
    if (!x0.ok()) return x0;
    return Decode(*x0, size.width, size.height);
  };
  // An eager run of this shape on this stream first, so that TorchScript, cuBLAS and cuDNN set
  // up their state (workspaces, plans) outside the capture. Its errors are real errors.
  try {
    absl::StatusOr<at::Tensor> eager = forward();
    if (!eager.ok()) return eager.status();
    instance.stream->synchronize();
  } catch (const c10::Error& e) {
    return Failed(absl::StrCat("eager run before CUDA graph capture at ", shape),
                  e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Failed(absl::StrCat("eager run before CUDA graph capture at ", shape), e.what());
  }

  std::string error;
  absl::StatusOr<at::Tensor> pixels = absl::UnknownError("not captured");
  try {
    graph->graph.capture_begin(instance.graph_pool);
    try {
      pixels = forward();
    } catch (const std::exception& e) {
      error = e.what();
    }
    // Always end the capture, so that the stream leaves capture mode; this throws when the
    // capture was invalidated (e.g. by an operation that synchronises with the host).
    graph->graph.capture_end();
  } catch (const std::exception& e) {
    if (error.empty()) error = e.what();
  }
  if (error.empty() && !pixels.ok()) error = std::string(pixels.status().message());
  if (!error.empty()) {
    (void)cudaGetLastError();  // capture errors are not sticky; clear them
    if (IsOutOfMemoryError(error)) ReleaseCachedMemory(device_name);
    spdlog::warn("model {}: CUDA graph capture at {} failed; this shape runs eagerly: {}",
                 manifest.name, shape, std::string(FirstLine(error)));
    return false;
  }
  graph->pixels = *std::move(pixels);
  instance.graphs[{size_index, batch_size}] = std::move(graph);
  return true;
}
#endif

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
  if (options.intra_op_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Pipeline::Options.intra_op_threads must be >= 0, got ", options.intra_op_threads));
  }
  if (options.instances < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("Pipeline::Options.instances must be >= 1, got ", options.instances));
  }
  absl::StatusOr<c10::Device> device = ParseDevice(options.device);
  if (!device.ok()) return device.status();
  if (options.postprocess == Postprocess::kCudaKernel) {
    if (!CudaBuild()) {
      return absl::FailedPreconditionError(
          "Pipeline::Options.postprocess: cuda_kernel needs a CUDA build (cmake "
          "-DDMDSERVE_CUDA=ON)");
    }
    if (!device->is_cuda()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Pipeline::Options.postprocess: cuda_kernel needs a CUDA device, got ", device->str()));
    }
  }
  if (manifest.uses_guidance()) {
    absl::Status valid = ValidateIds(options.uncond_input_ids, manifest.tokenizer.max_length,
                                     "Pipeline::Options.uncond_input_ids (needed because "
                                     "guidance_scale > 1)");
    if (!valid.ok()) return valid;
  }
  if (options.intra_op_threads > 0) at::set_num_threads(options.intra_op_threads);

  const ModelManifest::Components& files = manifest.components;
  const ModelManifest::ComponentDTypes& dtypes = manifest.dtypes;
  auto state = std::make_unique<State>();
  state->manifest = manifest;
  state->device = *device;
  state->device_name = device->str();
  state->generator_dtype = ToScalarType(dtypes.generator);
  state->decoder_dtype = ToScalarType(dtypes.decoder);
  state->postprocess = options.postprocess;
  state->cuda_graphs = options.cuda_graphs && device->is_cuda();
  absl::StatusOr<torch::jit::Module> text_encoder =
      LoadModule(files.text_encoder, "text_encoder", *device, ToScalarType(dtypes.text_encoder));
  if (!text_encoder.ok()) return text_encoder.status();
  state->text_encoder = *std::move(text_encoder);
  absl::StatusOr<torch::jit::Module> generator =
      LoadModule(files.generator, "generator", *device, state->generator_dtype);
  if (!generator.ok()) return generator.status();
  state->generator = *std::move(generator);
  absl::StatusOr<torch::jit::Module> decoder =
      LoadModule(files.decoder, "decoder", *device, state->decoder_dtype);
  if (!decoder.ok()) return decoder.status();
  state->decoder = *std::move(decoder);

  for (int i = 0; i < options.instances; ++i) {
    auto instance = std::make_unique<Instance>();
#if DMDSERVE_WITH_CUDA
    if (device->is_cuda()) {
      instance->stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device->index());
      instance->graph_pool = at::cuda::graph_pool_handle();
    }
#endif
    state->free_instances.push_back(instance.get());
    state->instances.push_back(std::move(instance));
  }

  try {
    if (manifest.uses_guidance()) {
      c10::InferenceMode inference_mode;
      const std::vector<int64_t> ids(options.uncond_input_ids.begin(),
                                     options.uncond_input_ids.end());
      absl::StatusOr<at::Tensor> uncond =
          state->EncodeText(at::tensor(ids, at::kLong).reshape({1, -1}).to(*device));
      if (!uncond.ok()) return uncond.status();
      state->uncond_embedding = uncond->to(state->generator_dtype);
    }
    // The weights and the embedding were made on the device's default stream; the instances'
    // streams do not wait for it.
    if (device->is_cuda()) torch::cuda::synchronize(device->index());
  } catch (const c10::Error& e) {
    return state->Failed("empty-prompt embedding", e.what_without_backtrace());
  } catch (const std::exception& e) {
    return state->Failed("empty-prompt embedding", e.what());
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
  const int size_index = m.SizeIndex(width, height);
  if (size_index < 0) {
    return absl::InvalidArgumentError(absl::StrCat("Pipeline::Run: size ", width, "x", height,
                                                   " is not supported by model ", m.name,
                                                   " (supported: ", m.SupportedSizesText(), ")"));
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    absl::Status valid = ValidateIds(batch[i].input_ids, m.tokenizer.max_length,
                                     absl::StrCat("Pipeline::Run: batch[", i, "].input_ids"));
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
      if (CapturedGraph* graph = s.GraphFor(*instance, size_index, static_cast<int>(batch.size()));
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

absl::StatusOr<int> Pipeline::CaptureGraphs() {
  int captured = 0;
#if DMDSERVE_WITH_CUDA
  State& s = *state_;
  if (!s.cuda_graphs) return 0;
  const absl::Time start = absl::Now();
  const ModelManifest& m = s.manifest;
  for (const std::unique_ptr<Instance>& instance : s.instances) {
    for (size_t size_index = 0; size_index < m.supported_sizes.size(); ++size_index) {
      // Largest first: the smaller graphs then fit in the pool memory the larger one freed.
      for (auto it = m.batch_sizes.rbegin(); it != m.batch_sizes.rend(); ++it) {
        absl::StatusOr<bool> ok = s.Capture(*instance, static_cast<int>(size_index), *it);
        if (!ok.ok()) return ok.status();
        captured += *ok ? 1 : 0;
      }
    }
  }
  spdlog::info(
      "model {}: captured {} CUDA graph(s) on {} in {} ({} instance(s) x {} size(s) x {} "
      "batch size(s))",
      m.name, captured, s.device_name, absl::FormatDuration(absl::Now() - start),
      s.instances.size(), m.supported_sizes.size(), m.batch_sizes.size());
#endif
  return captured;
}

const ModelManifest& Pipeline::manifest() const { return state_->manifest; }

const std::string& Pipeline::device() const { return state_->device_name; }

}  // namespace dmdserve
