// Pipeline: runs one model bundle's TorchScript components on one libtorch device, turning batches
// of token ids and seeds into uint8 images.
//
// Run() implements the sampling loop of docs/ARCHITECTURE.md exactly: per-image CPU noise
// generators seeded with the image's seed (the noise contract), the text encoder once per distinct
// prompt in the batch (on both tokenizations for a bundle with two tokenizers; SDXL's added
// conditions, the pooled embedding and time ids, go to the generator: docs/BUNDLE.md, v2), `manifest.steps()` generator calls (with classifier-free guidance on a
// doubled [uncond; cond] batch when guidance_scale > 1), epsilon -> x0 arithmetic in float32, the
// decoder, and conversion to uint8 HWC on the device. tools/reference_pipeline.py is the same
// loop in Python; pipeline_test checks that both agree.
//
// An image depends only on its own input_ids and seed, not on the other images of the batch or its
// position in it, up to float rounding differences of batched matrix products (docs/BUNDLE.md says
// what was measured).
//
// Execution instances: a pipeline has `Options.instances` of them, and each Run() holds one for
// its duration (waiting for a free one when all are busy). On a CUDA device an instance owns a
// CUDA stream from libtorch's pool, on which all its work runs, and its CUDA graphs; its inputs
// are staged in pinned host memory and its uint8 output comes back in one device-to-host copy.
// With Options.cuda_graphs, CaptureGraphs() records one CUDA graph per instance, supported size and
// manifest batch size; Run() then pads a batch up to the next manifest batch size and replays that
// graph (falling back to eager execution where capture failed). docs/GPU.md has the details.
//
// Out of memory: a batch whose allocation fails (GPU or CPU) returns RESOURCE_EXHAUSTED, after
// the CUDA caching allocator's unused blocks are returned to the driver; the pipeline stays usable.
//
// Ownership: owns its copy of the manifest, the loaded modules and the instances.
// Thread safety: Run(), Warmup() and the accessors are thread-safe; several worker threads may call
// Run() on one Pipeline concurrently (TorchScript methods may be invoked concurrently; each call
// keeps its tensors and noise generators to itself). CaptureGraphs() must not overlap any other
// call. No exception leaves the class: libtorch errors become absl::Status.
//
// Example:
//   auto manifest = ModelManifest::Load("models/tiny-random");
//   auto pipeline = Pipeline::Create(*manifest, {});
//   auto output = (*pipeline)->Run({{input_ids, /*seed=*/7}}, 32, 32);
#ifndef DMDSERVE_WORKER_PIPELINE_H_
#define DMDSERVE_WORKER_PIPELINE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "worker/model_manifest.h"

namespace dmdserve {

class Pipeline {
 public:
  // How decoded images become uint8 HWC pixels (worker/postprocess.h).
  enum class Postprocess {
    kTorchOps,    // libtorch ops; any device
    kCudaKernel,  // dmdserve's CUDA kernel; CUDA builds and CUDA devices only
  };

  struct Options {
    // libtorch device, as ParseDevice (worker/device.h) reads it: "cpu", or "cuda" (= "cuda:0")
    // / "cuda:N" / "N" in a CUDA build with a visible GPU (otherwise Create fails with
    // FAILED_PRECONDITION).
    std::string device = "cpu";
    // libtorch intra-op threads. Process-wide: Create calls at::set_num_threads. 0: leave
    // libtorch's default (one per core) alone.
    int intra_op_threads = 0;
    // input_ids of the empty prompt (the tokenizer's EncodeForModel("").input_ids: BOS, EOS, pad),
    // manifest.tokenizer.max_length long. Required when manifest.guidance_scale > 1 (Create runs
    // the text encoder on them once for the unconditional embedding); ignored otherwise.
    std::vector<int32_t> uncond_input_ids;
    // The empty prompt's input_ids from the second tokenizer (manifest.tokenizer_2). Required
    // when guidance uses the empty prompt and the manifest has a second tokenizer.
    std::vector<int32_t> uncond_input_ids_2;
    // Execution instances (see the class comment): how many Run() calls proceed at once. >= 1.
    // Default 1. Give it the number of threads that call Run().
    int instances = 1;
    // CUDA devices: CaptureGraphs() captures CUDA graphs. Ignored on the CPU. Default off.
    bool cuda_graphs = false;
    // Default: libtorch ops.
    Postprocess postprocess = Postprocess::kTorchOps;
    // CPU devices: Create stores the decoder's 4-d (convolution) weights channels-last (NHWC), so
    // that oneDNN runs the decoder's convolutions on NHWC activations instead of reordering
    // between layouts at every layer; the decoded images come out NHWC, as the uint8 conversion
    // wants them. Numerics: float rounding only (same ops, other summation order). Measured on
    // fashion-dmd at 1 and 2 intra-op threads: decoder 13-20% faster, 3-10% more images/s end to
    // end; the generator got slower channels-last, so only the decoder is converted
    // (docs/PERFORMANCE.md, "CPU kernels"). Ignored on CUDA devices (not measured there).
    // Default on.
    bool channels_last_decoder = true;
  };

  struct Input {
    std::vector<int32_t> input_ids;  // manifest.tokenizer.max_length ids, each >= 0
    uint64_t seed = 0;               // this image's noise seed
    // The second tokenizer's ids (same length) when the manifest has tokenizer_2; else empty.
    std::vector<int32_t> input_ids_2;
  };
  // Wall time of one Run and of its stages. A CUDA-graph replay runs every stage at once: its
  // stage times are zero and only `total` is measured.
  struct Timings {
    absl::Duration text_encoder;  // input staging (token ids, noise) + upload + text encoder
    absl::Duration generator;     // every sampling step
    absl::Duration decoder;       // decoder + uint8 conversion + copy to host memory
    absl::Duration total;         // the whole Run, from input staging to host memory
  };
  struct Output {
    // One per input, in input order: uint8 pixels, row-major HWC, height * width * channels bytes.
    std::vector<std::string> images;
    Timings timings;
    // The batch the model ran: the inputs, padded up to a CUDA graph's batch size if one ran.
    int run_batch_size = 0;
    bool cuda_graph = false;  // a CUDA graph was replayed
  };

  // "torch" or "cuda_kernel"; INVALID_ARGUMENT naming the value otherwise.
  static absl::StatusOr<Postprocess> ParsePostprocess(absl::string_view name);

  // Loads the three TorchScript components of `manifest` onto `options.device` (in eval mode, in
  // the manifest's dtypes) and, with guidance, computes the unconditional embedding. Errors:
  // INVALID_ARGUMENT for bad options or a file that is not loadable TorchScript (naming the file),
  // FAILED_PRECONDITION for a CUDA device or the CUDA kernel without CUDA.
  static absl::StatusOr<std::unique_ptr<Pipeline>> Create(const ModelManifest& manifest,
                                                          const Options& options);

  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // Generates one image per element of `batch` at `width` x `height` (a supported size).
  // INVALID_ARGUMENT: empty batch, more than manifest.max_batch_size() inputs, wrong input_ids
  // length or a negative id, unsupported size. RESOURCE_EXHAUSTED: the device (or host) ran out
  // of memory for this batch. INTERNAL: a component failed or returned a tensor of the wrong shape
  // (the message names the component; libtorch's details go to the log).
  absl::StatusOr<Output> Run(absl::Span<const Input> batch, int width, int height) const;

  // A batch of `batch_size` distinct synthetic prompts (so that the text encoder runs on all of
  // them) with seeds 0..batch_size-1, for warm-up and for timing batch sizes.
  static std::vector<Input> SyntheticBatch(const ModelManifest& manifest, int batch_size);

  // Runs every supported size at every manifest batch size once, so that the first requests do
  // not pay for TorchScript's profiling runs and allocator growth. An error names the size and
  // batch size that failed.
  absl::Status Warmup() const;

  // With Options.cuda_graphs on a CUDA device: captures a CUDA graph per instance, supported size
  // and manifest batch size (largest first; an instance's graphs share one memory pool), after an
  // eager run of that shape on the instance's stream. Call after Warmup() (TorchScript must have
  // finished optimising its graphs), once, before serving. A shape whose capture fails is logged
  // and stays eager. Returns the number of graphs captured: 0 on the CPU or without cuda_graphs.
  // Errors: those of the eager runs (as Run()).
  absl::StatusOr<int> CaptureGraphs();

  const ModelManifest& manifest() const;
  // The canonical device: "cpu" or "cuda:N".
  const std::string& device() const;

 private:
  struct State;
  struct Instance;
  explicit Pipeline(std::unique_ptr<State> state);

  std::unique_ptr<State> state_;
};

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_PIPELINE_H_
