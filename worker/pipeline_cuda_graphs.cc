// Pipeline's CUDA graphs: capture at warm-up (Pipeline::CaptureGraphs) and replay in Run(). One
// graph per instance, supported size and manifest batch size covers every stage, from the token
// ids and noise in its static input tensors to the uint8 pixels in its static output tensor.
// docs/GPU.md describes them. Compiled only in a CUDA build (-DDMDSERVE_CUDA=ON); the CPU build's
// cuda_compile_check test compiles it too.
#if !DMDSERVE_WITH_CUDA
#error "pipeline_cuda_graphs.cc needs DMDSERVE_WITH_CUDA=1 (cmake -DDMDSERVE_CUDA=ON)"
#endif

#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/InferenceMode.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "spdlog/spdlog.h"
#include "worker/device.h"
#include "worker/pipeline_internal.h"

namespace dmdserve {

using pipeline_internal::CapturedGraph;
using pipeline_internal::FirstLine;
using pipeline_internal::HostInputs;

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
  if (graph.ids_2.defined()) graph.ids_2.copy_(host.ids_2, /*non_blocking=*/true);
  graph.noise.copy_(host.noise, /*non_blocking=*/true);
  graph.graph.replay();
  Output output;
  output.images = CopyOut(instance, graph.pixels, static_cast<int64_t>(batch.size()));
  output.run_batch_size = graph.batch_size;
  output.cuda_graph = true;
  output.timings.total = absl::Now() - begin;
  return output;
}

absl::StatusOr<int> Pipeline::State::CaptureAllGraphs() {
  if (!cuda_graphs) return 0;
  const absl::Time start = absl::Now();
  int captured = 0;
  for (const std::unique_ptr<Instance>& instance : instances) {
    for (size_t size_index = 0; size_index < manifest.supported_sizes.size(); ++size_index) {
      // Largest first: the smaller graphs then fit in the pool memory the larger one freed.
      for (auto it = manifest.batch_sizes.rbegin(); it != manifest.batch_sizes.rend(); ++it) {
        absl::StatusOr<bool> ok = Capture(*instance, static_cast<int>(size_index), *it);
        if (!ok.ok()) return ok.status();
        captured += *ok ? 1 : 0;
      }
    }
  }
  spdlog::info(
      "model {}: captured {} CUDA graph(s) on {} in {} ({} instance(s) x {} size(s) x {} "
      "batch size(s))",
      manifest.name, captured, device_name, absl::FormatDuration(absl::Now() - start),
      instances.size(), manifest.supported_sizes.size(), manifest.batch_sizes.size());
  return captured;
}

absl::StatusOr<bool> Pipeline::State::Capture(Instance& instance, int size_index, int batch_size) {
  const ModelManifest::Size size = manifest.supported_sizes[size_index];
  const std::string shape =
      absl::StrCat(size.width, "x", size.height, ", batch size ", batch_size, " on ", device_name);
  c10::InferenceMode inference_mode;
  const c10::cuda::CUDAStreamGuard stream_guard(*instance.stream);
  std::unique_ptr<CapturedGraph> graph = NewGraph(size, batch_size);
  if (absl::Status s = RunEagerBeforeCapture(instance, *graph, size, shape); !s.ok()) return s;
  const std::string error = Record(instance, *graph, size);
  if (!error.empty()) {
    (void)cudaGetLastError();  // capture errors are not sticky; clear them
    if (IsOutOfMemoryError(error)) ReleaseCachedMemory(device_name);
    spdlog::warn("model {}: CUDA graph capture at {} failed; this shape runs eagerly: {}",
                 manifest.name, shape, std::string(FirstLine(error)));
    return false;
  }
  instance.graphs[{size_index, batch_size}] = std::move(graph);
  return true;
}

std::unique_ptr<CapturedGraph> Pipeline::State::NewGraph(const ModelManifest::Size& size,
                                                         int batch_size) const {
  const std::array<int64_t, 3> latent = manifest.LatentShape(size.width, size.height);
  const int64_t draws =
      manifest.schedule.step_mode == StepMode::kRenoise ? manifest.steps() : int64_t{1};
  auto graph = std::make_unique<CapturedGraph>();
  graph->batch_size = batch_size;
  graph->ids = at::zeros({batch_size, manifest.tokenizer.max_length},
                         at::TensorOptions(at::kLong).device(device));
  graph->ids.select(1, 0).copy_(at::arange(batch_size, at::TensorOptions(at::kLong)));
  if (manifest.tokenizer_2.has_value()) graph->ids_2 = graph->ids.clone();
  graph->noise = at::randn({batch_size, draws, latent[0], latent[1], latent[2]},
                           at::TensorOptions(at::kFloat).device(device));
  return graph;
}

absl::StatusOr<at::Tensor> Pipeline::State::RunGraphStages(const CapturedGraph& graph,
                                                           const ModelManifest::Size& size) const {
  absl::StatusOr<TextEmbedding> embedding = EmbedPrompts(graph.ids, graph.ids_2, at::Tensor());
  if (!embedding.ok()) return embedding.status();
  absl::StatusOr<at::Tensor> x0 = Sample(graph.noise, *embedding, size.width, size.height);
  if (!x0.ok()) return x0;
  return Decode(*x0, size.width, size.height);
}

absl::Status Pipeline::State::RunEagerBeforeCapture(const Instance& instance,
                                                    const CapturedGraph& graph,
                                                    const ModelManifest::Size& size,
                                                    const std::string& shape) const {
  // So that TorchScript, cuBLAS and cuDNN set up their state (workspaces, plans) outside the
  // capture.
  try {
    absl::StatusOr<at::Tensor> eager = RunGraphStages(graph, size);
    if (!eager.ok()) return eager.status();
    instance.stream->synchronize();
  } catch (const c10::Error& e) {
    return Failed(absl::StrCat("eager run before CUDA graph capture at ", shape),
                  e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Failed(absl::StrCat("eager run before CUDA graph capture at ", shape), e.what());
  }
  return absl::OkStatus();
}

std::string Pipeline::State::Record(Instance& instance, CapturedGraph& graph,
                                    const ModelManifest::Size& size) const {
  std::string error;
  absl::StatusOr<at::Tensor> pixels = absl::UnknownError("not captured");
  try {
    graph.graph.capture_begin(instance.graph_pool);
    try {
      pixels = RunGraphStages(graph, size);
    } catch (const std::exception& e) {
      error = e.what();
    }
    // Always end the capture, so that the stream leaves capture mode; this throws when the
    // capture was invalidated (e.g. by an operation that synchronises with the host).
    graph.graph.capture_end();
  } catch (const std::exception& e) {
    if (error.empty()) error = e.what();
  }
  if (error.empty() && !pixels.ok()) error = std::string(pixels.status().message());
  if (error.empty()) graph.pixels = *std::move(pixels);
  return error;
}

}  // namespace dmdserve
