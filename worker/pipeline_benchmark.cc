// Raw in-process throughput of Pipeline::Run on models/tiny-random: no tokenizer, batcher, PNG
// encoding or RPC. Each batch has distinct prompts, so the text encoder runs on the whole batch.
//
//   build-pipe/worker/pipeline_benchmark
#include <benchmark/benchmark.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "worker/model_manifest.h"
#include "worker/pipeline.h"

namespace dmdserve {
namespace {

// The warmed-up pipeline of models/tiny-random, shared by every benchmark; aborts on error.
const Pipeline& TinyPipeline() {
  static const Pipeline* const pipeline = [] {
    absl::StatusOr<ModelManifest> manifest =
        ModelManifest::Load(DMDSERVE_SOURCE_DIR "/models/tiny-random");
    absl::StatusOr<std::unique_ptr<Pipeline>> created =
        manifest.ok() ? Pipeline::Create(*manifest, {}) : manifest.status();
    absl::Status warmup = created.ok() ? (*created)->Warmup() : created.status();
    if (!warmup.ok()) {
      std::fprintf(stderr, "cannot set up the pipeline: %s\n", warmup.ToString().c_str());
      std::abort();
    }
    return created->release();
  }();
  return *pipeline;
}

void BM_PipelineRun(benchmark::State& state) {
  const Pipeline& pipeline = TinyPipeline();
  const ModelManifest& manifest = pipeline.manifest();
  const int batch_size = static_cast<int>(state.range(0));
  std::vector<Pipeline::Input> batch(batch_size);
  for (int i = 0; i < batch_size; ++i) {
    batch[i].input_ids.assign(manifest.tokenizer.max_length, 0);
    batch[i].input_ids[1] = i;
    batch[i].seed = i;
  }
  absl::Duration text_encoder, generator, decoder;
  for (auto _ : state) {
    absl::StatusOr<Pipeline::Output> output = pipeline.Run(batch, manifest.width, manifest.height);
    if (!output.ok()) {
      state.SkipWithError(output.status().ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(output->images.data());
    text_encoder += output->timings.text_encoder;
    generator += output->timings.generator;
    decoder += output->timings.decoder;
  }
  state.counters["images_per_second"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * batch_size, benchmark::Counter::kIsRate);
  // Mean stage times per batch, in milliseconds.
  const auto per_batch_ms = [&](absl::Duration total) {
    return benchmark::Counter(absl::ToDoubleMilliseconds(total),
                              benchmark::Counter::kAvgIterations);
  };
  state.counters["text_encoder_ms"] = per_batch_ms(text_encoder);
  state.counters["generator_ms"] = per_batch_ms(generator);
  state.counters["decoder_ms"] = per_batch_ms(decoder);
}
BENCHMARK(BM_PipelineRun)
    ->ArgName("batch")
    ->Arg(1)
    ->Arg(2)
    ->Arg(4)
    ->Arg(8)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace dmdserve

// --jit_optimize=true|false (default true, as in dmdserve) sets TorchScript's graph-executor
// optimisation before anything runs; every other flag goes to Google Benchmark.
int main(int argc, char** argv) {
  bool jit_optimize = true;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--jit_optimize=", 0) == 0) {
      jit_optimize = arg.substr(strlen("--jit_optimize=")) == "true";
    } else {
      args.push_back(argv[i]);
    }
  }
  torch::jit::setGraphExecutorOptimize(jit_optimize);
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
