// Pipeline's internals, shared by its two sources: worker/pipeline.cc (creation, the eager path,
// instances) and worker/pipeline_cuda_graphs.cc (CUDA-graph capture and replay, compiled only
// with -DDMDSERVE_CUDA=ON). Not part of worker/'s API: include worker/pipeline.h instead.
//
// Ownership and thread safety are those of Pipeline (worker/pipeline.h): State is its only
// member; its const methods may run concurrently, each on its own Instance.
#ifndef DMDSERVE_WORKER_PIPELINE_INTERNAL_H_
#define DMDSERVE_WORKER_PIPELINE_INTERNAL_H_

#include <torch/script.h>

#if DMDSERVE_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "worker/model_manifest.h"
#include "worker/pipeline.h"

namespace dmdserve {
namespace pipeline_internal {

// The first line of `text` (libtorch's messages continue with a backtrace).
inline absl::string_view FirstLine(absl::string_view text) {
  return text.substr(0, text.find('\n'));
}

// A batch's inputs in host memory (pinned for a CUDA device), one copy each from the device.
struct HostInputs {
  at::Tensor ids;    // [rows, L] int64: one row per distinct prompt, or one per image
  at::Tensor ids_2;  // the same rows from the second tokenizer; undefined without tokenizer_2
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
  at::Tensor ids_2;   // likewise for the second tokenizer; undefined without tokenizer_2
  at::Tensor noise;   // [batch_size, draws, C, h, w] float32
  at::Tensor pixels;  // [batch_size, H, W, channels] uint8
};
#endif

// The text encoder's outputs for some prompts.
struct TextEmbedding {
  at::Tensor hidden;  // [rows, L, D]: the generator's encoder_hidden_states
  at::Tensor pooled;  // [rows, P]: the pooled embedding; defined only for "text_time" bundles
};

}  // namespace pipeline_internal

// What one Run() needs to itself (see the class comment). Taken from State::free_instances.
struct Pipeline::Instance {
#if DMDSERVE_WITH_CUDA
  // CUDA devices only: the stream all of this instance's work runs on, the memory pool its graphs
  // share (they never run concurrently), and the graphs by (size index, batch size).
  std::optional<c10::cuda::CUDAStream> stream;
  decltype(at::cuda::graph_pool_handle()) graph_pool{};
  std::map<std::pair<int, int>, std::unique_ptr<pipeline_internal::CapturedGraph>> graphs;
#endif
};

struct Pipeline::State {
  using HostInputs = pipeline_internal::HostInputs;
  using TextEmbedding = pipeline_internal::TextEmbedding;

  ModelManifest manifest;
  c10::Device device{c10::kCPU};
  std::string device_name;  // "cpu", "cuda:N"
  at::ScalarType generator_dtype = at::kFloat;
  at::ScalarType decoder_dtype = at::kFloat;
  Postprocess postprocess = Postprocess::kTorchOps;
  bool cuda_graphs = false;
  bool channels_last_decoder = false;  // Options.channels_last_decoder, on a CPU device
  // TorchScript methods are safe to run concurrently; forward() is merely not marked const.
  mutable torch::jit::Module text_encoder;
  mutable torch::jit::Module generator;
  mutable torch::jit::Module decoder;
  // Text embedding of the empty prompt, [1, L, D] (and [1, P]) in the generator's dtype on
  // `device`; set only when the manifest uses guidance with the empty prompt.
  TextEmbedding uncond_embedding;
  std::vector<std::unique_ptr<Instance>> instances;
  mutable absl::Mutex instances_mu;
  mutable std::vector<Instance*> free_instances ABSL_GUARDED_BY(instances_mu);

  // Create's steps after validation (pipeline.cc). Loads the three TorchScript components onto
  // `device` in the manifest's dtypes (the decoder's convolution weights channels-last with
  // `channels_last_decoder`); errors name the file.
  absl::Status LoadComponents();
  // Adds `count` free instances, each with its own stream from libtorch's pool on a CUDA device.
  void AddInstances(int count);
  // With guidance on the empty prompt, computes `uncond_embedding` from its input ids (Options).
  // Then waits for the device's default stream, on which the weights and the embedding were made
  // (the instances' streams do not wait for it).
  absl::Status EmbedEmptyPrompt(const Options& options);

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
  // Runs `module` on `inputs`; libtorch errors become a status (Failed).
  absl::StatusOr<c10::IValue> Invoke(torch::jit::Module& module, absl::string_view component,
                                     std::vector<c10::IValue> inputs) const;
  // `module`'s output as a tuple of exactly `count` tensors; INTERNAL naming `component` when
  // it is anything else.
  absl::StatusOr<std::vector<at::Tensor>> CallForTuple(torch::jit::Module& module,
                                                       absl::string_view component,
                                                       std::vector<c10::IValue> inputs,
                                                       size_t count) const;
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
  // The text encoder's outputs for `ids` (and `ids_2`, with tokenizer_2), [rows, max_length]
  // int64 on the device: hidden states [rows, L, D] (and pooled [rows, P] for text_time).
  absl::StatusOr<TextEmbedding> EncodeText(const at::Tensor& ids, const at::Tensor& ids_2) const;
  // The generator's text inputs in its dtype: [n, ...], or [2n, ...] = [uncond; cond] with
  // guidance. `rows` (on the device) picks each image's row of the encoded ids; undefined: row i
  // for image i.
  absl::StatusOr<TextEmbedding> EmbedPrompts(const at::Tensor& ids, const at::Tensor& ids_2,
                                             const at::Tensor& rows) const;
  // The sampling loop on `noise` (HostInputs::noise on the device) for `height` x `width`
  // images: x0, float32 [n, C, h, w].
  absl::StatusOr<at::Tensor> Sample(const at::Tensor& noise, const TextEmbedding& embedding,
                                    int width, int height) const;
  // One generator call on `z` ([n, C, h, w], already doubled with guidance) at timestep `t`.
  absl::StatusOr<at::Tensor> Predict(const at::Tensor& z, int t, const TextEmbedding& embedding,
                                     const at::Tensor& time_ids) const;
  // SDXL's time ids [H, W, 0, 0, H, W] for `rows` images, in the generator's dtype on the device.
  at::Tensor TimeIds(int64_t rows, int width, int height) const;
  // Decodes x0 into uint8 NHWC pixels on the device.
  absl::StatusOr<at::Tensor> Decode(const at::Tensor& x0, int width, int height) const;
  // The first `n` images of `pixels`, brought to host memory (one copy from a GPU).
  std::vector<std::string> CopyOut(const Instance& instance, const at::Tensor& pixels,
                                   int64_t n) const;
  // Run() without a CUDA graph, on the current stream.
  absl::StatusOr<Output> RunEager(const Instance& instance, absl::Span<const Input> batch,
                                  int width, int height) const;

#if DMDSERVE_WITH_CUDA
  // CUDA graphs (pipeline_cuda_graphs.cc).
  using CapturedGraph = pipeline_internal::CapturedGraph;
  // The graph a batch of `n` images at `size_index` replays: the one captured for the smallest
  // manifest batch size >= n, if its capture succeeded.
  CapturedGraph* GraphFor(Instance& instance, int size_index, int n) const;
  // Run() by replaying `graph` (on the current stream, `instance`'s).
  absl::StatusOr<Output> Replay(const Instance& instance, CapturedGraph& graph,
                                absl::Span<const Input> batch) const;
  // Pipeline::CaptureGraphs(): every instance's graphs; the number captured.
  absl::StatusOr<int> CaptureAllGraphs();
  // Captures `instance`'s graph for one shape; false (logged) when capture failed.
  absl::StatusOr<bool> Capture(Instance& instance, int size_index, int batch_size);
  // Capture's steps: the graph's static inputs (distinct prompts, random noise), allocated
  // outside the graph's pool; every stage of the pipeline on them; an eager run of the shape on
  // the instance's stream (errors are real errors); and the recording, which returns the error
  // that spoilt it ("" when it succeeded, with graph.pixels then set).
  std::unique_ptr<CapturedGraph> NewGraph(const ModelManifest::Size& size, int batch_size) const;
  absl::StatusOr<at::Tensor> RunGraphStages(const CapturedGraph& graph,
                                            const ModelManifest::Size& size) const;
  absl::Status RunEagerBeforeCapture(const Instance& instance, const CapturedGraph& graph,
                                     const ModelManifest::Size& size,
                                     const std::string& shape) const;
  std::string Record(Instance& instance, CapturedGraph& graph,
                     const ModelManifest::Size& size) const;
#endif
};

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_PIPELINE_INTERNAL_H_
