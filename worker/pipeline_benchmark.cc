// Raw in-process throughput of Pipeline::Run: no tokenizer, batcher, PNG encoding or RPC. Each
// batch has distinct prompts, so the text encoder runs on the whole batch. One benchmark per
// manifest batch size, at the bundle's default size, run by as many threads at once as dmdserve
// runs model workers (each on its own execution instance).
//
//   build/worker/pipeline_benchmark [--bundle=models/tiny-random] [--device=cpu|cuda:N]
//       [--dtype=SPEC] [--cuda_graphs=true|false] [--postprocess=torch|cuda_kernel]
//       [--jit_optimize=true|false] [--channels_last_decoder=true|false] [--instances=N]
//       [--intra_op_threads=N] [--malloc_tuning=true|false] [Google Benchmark flags]
//
// --dtype overrides the manifest's dtypes like dmdserve --dtype; --cuda_graphs captures a CUDA
// graph per batch size after warm-up (GPUs; docs/GPU.md); --channels_last_decoder sets the
// Pipeline::Options field of that name. --instances and --intra_op_threads (0: derived from the
// CPU budget exactly as dmdserve derives them, worker/cpu_budget.h) set the concurrent workers
// and libtorch's intra-op threads; images_per_second sums over the workers. --malloc_tuning
// (default true) applies dmdserve's glibc malloc thresholds (worker/malloc_tuning.h), so that
// the raw figures compare with the served ones.
#include <benchmark/benchmark.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "worker/cpu_budget.h"
#include "worker/malloc_tuning.h"
#include "worker/model_manifest.h"
#include "worker/pipeline.h"

namespace dmdserve {
namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "pipeline_benchmark: %s\n", message.c_str());
  std::exit(1);
}

// Loads the bundle and warms the pipeline up as dmdserve does (two eager passes, then CUDA graph
// capture); exits on error.
std::unique_ptr<Pipeline> MakePipeline(const std::map<std::string, std::string>& flags) {
  absl::StatusOr<ModelManifest> manifest = ModelManifest::Load(flags.at("bundle"));
  if (!manifest.ok()) Die(manifest.status().ToString());
  if (absl::Status s = ApplyDTypeOverride(flags.at("dtype"), manifest->dtypes); !s.ok()) {
    Die(s.ToString());
  }
  absl::StatusOr<Pipeline::Postprocess> postprocess =
      Pipeline::ParsePostprocess(flags.at("postprocess"));
  if (!postprocess.ok()) Die(postprocess.status().ToString());
  Pipeline::Options options;
  options.device = flags.at("device");
  options.instances = std::stoi(flags.at("instances"));
  options.intra_op_threads = std::stoi(flags.at("intra_op_threads"));
  options.cuda_graphs = flags.at("cuda_graphs") == "true";
  options.postprocess = *postprocess;
  options.channels_last_decoder = flags.at("channels_last_decoder") == "true";
  // Guidance needs the empty prompt's ids: BOS, then EOS as padding (CLIP's layout).
  options.uncond_input_ids.assign(manifest->tokenizer.max_length, 49407);
  options.uncond_input_ids[0] = 49406;
  absl::StatusOr<std::unique_ptr<Pipeline>> pipeline = Pipeline::Create(*manifest, options);
  if (!pipeline.ok()) Die(pipeline.status().ToString());
  for (int run = 0; run < 2; ++run) {
    if (absl::Status s = (*pipeline)->Warmup(); !s.ok()) Die(s.ToString());
  }
  absl::StatusOr<int> graphs = (*pipeline)->CaptureGraphs();
  if (!graphs.ok()) Die(graphs.status().ToString());
  std::fprintf(stderr,
               "pipeline_benchmark: %s on %s, %d instance(s) x %d intra-op thread(s), dtypes "
               "%s/%s/%s, %d CUDA graph(s)\n",
               manifest->name.c_str(), (*pipeline)->device().c_str(), options.instances,
               options.intra_op_threads,
               DTypeName(manifest->dtypes.text_encoder), DTypeName(manifest->dtypes.generator),
               DTypeName(manifest->dtypes.decoder), *graphs);
  return *std::move(pipeline);
}

// Replaces --instances and --intra_op_threads of 0 by dmdserve's derived values (on a GPU:
// 1 instance, every usable CPU for intra-op threads) and prints the CPU budget.
void SettleThreads(std::map<std::string, std::string>& flags) {
  const CpuBudget budget = ReadCpuBudget();
  const int instances = std::stoi(flags.at("instances"));
  const int threads = std::stoi(flags.at("intra_op_threads"));
  const CpuThreadPlan plan =
      PlanThreads(budget.usable_cpus, flags.at("device") == "cpu", instances, threads);
  flags["instances"] = std::to_string(plan.instances);
  flags["intra_op_threads"] = std::to_string(plan.intra_op_threads);
  std::fprintf(stderr, "pipeline_benchmark: CPU budget %s\n", budget.Describe().c_str());
}

void BM_PipelineRun(benchmark::State& state, const Pipeline* pipeline) {
  const ModelManifest& manifest = pipeline->manifest();
  const int batch_size = static_cast<int>(state.range(0));
  std::vector<Pipeline::Input> batch(batch_size);
  for (int i = 0; i < batch_size; ++i) {
    batch[i].input_ids.assign(manifest.tokenizer.max_length, 0);
    batch[i].input_ids[1] = i;
    batch[i].seed = i;
  }
  absl::Duration text_encoder, generator, decoder, total;
  int run_batch = 0;
  bool graph = false;
  for (auto _ : state) {
    absl::StatusOr<Pipeline::Output> output = pipeline->Run(batch, manifest.width, manifest.height);
    if (!output.ok()) {
      state.SkipWithError(output.status().ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(output->images.data());
    text_encoder += output->timings.text_encoder;
    generator += output->timings.generator;
    decoder += output->timings.decoder;
    total += output->timings.total;
    run_batch = output->run_batch_size;
    graph = output->cuda_graph;
  }
  state.counters["images_per_second"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * batch_size, benchmark::Counter::kIsRate);
  // Mean stage times per batch, in milliseconds (zero for CUDA-graph replays, which have none).
  const auto per_batch_ms = [&](absl::Duration sum) {
    return benchmark::Counter(absl::ToDoubleMilliseconds(sum), benchmark::Counter::kAvgIterations);
  };
  state.counters["text_encoder_ms"] = per_batch_ms(text_encoder);
  state.counters["generator_ms"] = per_batch_ms(generator);
  state.counters["decoder_ms"] = per_batch_ms(decoder);
  state.counters["total_ms"] = per_batch_ms(total);
  state.counters["run_batch"] = benchmark::Counter(run_batch, benchmark::Counter::kAvgThreads);
  state.counters["cuda_graph"] = benchmark::Counter(graph ? 1 : 0, benchmark::Counter::kAvgThreads);
}

}  // namespace
}  // namespace dmdserve

// This binary's flags (--name=value, defaults below) are taken out; every other flag goes to
// Google Benchmark. --jit_optimize sets TorchScript's graph-executor optimisation (default true,
// as in dmdserve) before anything runs.
int main(int argc, char** argv) {
  std::map<std::string, std::string> flags = {
      {"bundle", DMDSERVE_SOURCE_DIR "/models/tiny-random"},
      {"device", "cpu"},
      {"dtype", ""},
      {"cuda_graphs", "false"},
      {"postprocess", "torch"},
      {"jit_optimize", "true"},
      {"channels_last_decoder", "true"},
      {"instances", "0"},
      {"intra_op_threads", "0"},
      {"malloc_tuning", "true"},
  };
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    bool ours = false;
    for (auto& [name, value] : flags) {
      const std::string prefix = absl::StrCat("--", name, "=");
      if (absl::StartsWith(arg, prefix)) {
        value = arg.substr(prefix.size());
        ours = true;
      }
    }
    if (!ours) args.push_back(argv[i]);
  }
  torch::jit::setGraphExecutorOptimize(flags["jit_optimize"] == "true");
  dmdserve::SettleThreads(flags);
  if (flags["malloc_tuning"] == "true") {
    if (absl::Status s = dmdserve::ApplyMallocTuning({}); !s.ok()) dmdserve::Die(s.ToString());
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  const std::unique_ptr<dmdserve::Pipeline> pipeline = dmdserve::MakePipeline(flags);
  for (const int batch_size : pipeline->manifest().batch_sizes) {
    benchmark::RegisterBenchmark("BM_PipelineRun", dmdserve::BM_PipelineRun, pipeline.get())
        ->ArgName("batch")
        ->Arg(batch_size)
        ->Threads(std::stoi(flags["instances"]))
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
