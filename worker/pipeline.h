// Pipeline: runs one model bundle's TorchScript components on one libtorch device, turning batches
// of token ids and seeds into uint8 images.
//
// Run() implements the sampling loop of docs/ARCHITECTURE.md exactly: per-image CPU noise
// generators seeded with the image's seed (the noise contract), the text encoder once per distinct
// prompt in the batch, `manifest.steps()` generator calls (with classifier-free guidance on a
// doubled [uncond; cond] batch when guidance_scale > 1), epsilon -> x0 arithmetic in float32, the
// decoder, and conversion to uint8 HWC. scripts/reference_pipeline.py is the same loop in Python;
// pipeline_test checks that both agree.
//
// An image depends only on its own input_ids and seed, not on the other images of the batch or its
// position in it, up to float rounding differences of batched matrix products (docs/BUNDLE.md says
// what was measured).
//
// Ownership: owns its copy of the manifest and the loaded modules.
// Thread safety: Run(), Warmup() and the accessors are thread-safe; several worker threads may call
// Run() on one Pipeline concurrently (TorchScript methods may be invoked concurrently; each call
// keeps its tensors and noise generators to itself). No exception leaves the class: libtorch errors
// become absl::Status.
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
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "worker/model_manifest.h"

namespace dmdserve {

class Pipeline {
 public:
  struct Options {
    // libtorch device, parsed by torch::Device: "cpu", or "cuda" / "cuda:N" in a CUDA build with a
    // visible GPU (otherwise Create fails with FAILED_PRECONDITION).
    std::string device = "cpu";
    // libtorch intra-op threads. Process-wide: Create calls at::set_num_threads. 0: leave
    // libtorch's default (one per core) alone.
    int intra_op_threads = 0;
    // input_ids of the empty prompt (the tokenizer's EncodeForModel("").input_ids: BOS, EOS, pad),
    // manifest.tokenizer.max_length long. Required when manifest.guidance_scale > 1 (Create runs
    // the text encoder on them once for the unconditional embedding); ignored otherwise.
    std::vector<int32_t> uncond_input_ids;
  };

  struct Input {
    std::vector<int32_t> input_ids;  // manifest.tokenizer.max_length ids, each >= 0
    uint64_t seed = 0;               // this image's noise seed
  };
  // Wall time of each stage of one Run.
  struct Timings {
    absl::Duration text_encoder;  // token upload + text encoder
    absl::Duration generator;     // noise + every sampling step
    absl::Duration decoder;       // decoder + uint8 conversion + copy to host memory
  };
  struct Output {
    // One per input, in input order: uint8 pixels, row-major HWC, height * width * channels bytes.
    std::vector<std::string> images;
    Timings timings;
  };

  // Loads the three TorchScript components of `manifest` onto `options.device` (in eval mode, in
  // the manifest's dtypes) and, with guidance, computes the unconditional embedding. Errors:
  // INVALID_ARGUMENT for bad options or a file that is not loadable TorchScript (naming the file),
  // FAILED_PRECONDITION for a CUDA device without CUDA.
  static absl::StatusOr<std::unique_ptr<Pipeline>> Create(const ModelManifest& manifest,
                                                          const Options& options);

  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // Generates one image per element of `batch` at `width` x `height` (a supported size).
  // INVALID_ARGUMENT: empty batch, more than manifest.max_batch_size() inputs, wrong input_ids
  // length or a negative id, unsupported size. INTERNAL: a component failed or returned a tensor
  // of the wrong shape (the message names the component; libtorch's details go to the log).
  absl::StatusOr<Output> Run(absl::Span<const Input> batch, int width, int height) const;

  // Runs every supported size at every manifest batch size once, so that the first requests do
  // not pay for TorchScript's profiling runs and allocator growth. An error names the size and
  // batch size that failed.
  absl::Status Warmup() const;

  const ModelManifest& manifest() const;

 private:
  struct State;
  explicit Pipeline(std::unique_ptr<State> state);

  std::unique_ptr<State> state_;
};

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_PIPELINE_H_
