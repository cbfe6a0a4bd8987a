// ClipTokenizer benchmarks: microseconds per prompt (the reported time) and tokens per second
// (items_per_second), for a typical 20-word prompt and a 300-word prompt, warm (words served by
// the word cache) and cold (cache disabled: every word goes through BPE).
//
// Run: build-*/worker/clip_tokenizer_benchmark [--benchmark_repetitions=5]
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>

#include "worker/clip_tokenizer.h"

namespace dmdserve {
namespace {

// 20 words, 22 tokens.
constexpr char kTypicalPrompt[] =
    "a portrait of a woman with red hair in a green dress, standing in a field of sunflowers, "
    "digital art";

std::string LongPrompt() {
  static const char* const kWords[] = {
      "cinematic",  "photograph", "of",        "an",          "ancient",  "library",   "carved",
      "into",       "a",          "mountain",  "glowing",     "lanterns", "dust",      "motes",
      "volumetric", "light",      "intricate", "wooden",      "shelves",  "scholars",  "robes",
      "8k",         "ultra",      "detailed",  "masterpiece", "by",       "greg",      "rutkowski",
      "and",        "alphonse",   "mucha",     "trending",    "on",       "artstation"};
  std::string prompt;
  for (int i = 0; i < 300; ++i) {
    if (i > 0) prompt += (i % 12 == 0) ? ", " : " ";
    prompt += kWords[(i * 7) % (sizeof(kWords) / sizeof(kWords[0]))];
  }
  return prompt;
}

std::unique_ptr<ClipTokenizer> MakeTokenizer(size_t cache_capacity) {
  ClipTokenizer::Options options;
  options.vocab_path = DMDSERVE_SOURCE_DIR "/models/tokenizers/openai-clip/vocab.json";
  options.merges_path = DMDSERVE_SOURCE_DIR "/models/tokenizers/openai-clip/merges.txt";
  options.word_cache_capacity = cache_capacity;
  auto tokenizer = ClipTokenizer::Create(options);
  if (!tokenizer.ok()) {
    std::cerr << tokenizer.status() << "\n";
    std::abort();
  }
  return *std::move(tokenizer);
}

void RunEncode(benchmark::State& state, const std::string& text, size_t cache_capacity) {
  const std::unique_ptr<ClipTokenizer> tokenizer = MakeTokenizer(cache_capacity);
  const size_t tokens = tokenizer->Encode(text)->size();  // also warms the cache
  for (auto _ : state) {
    auto ids = tokenizer->Encode(text);
    benchmark::DoNotOptimize(ids);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * tokens));
  state.counters["tokens"] = static_cast<double>(tokens);
}

void BM_EncodeTypicalWarm(benchmark::State& state) { RunEncode(state, kTypicalPrompt, 1 << 16); }
void BM_EncodeTypicalCold(benchmark::State& state) { RunEncode(state, kTypicalPrompt, 0); }
void BM_EncodeLongWarm(benchmark::State& state) { RunEncode(state, LongPrompt(), 1 << 16); }
void BM_EncodeLongCold(benchmark::State& state) { RunEncode(state, LongPrompt(), 0); }

void BM_EncodeForModelTypicalWarm(benchmark::State& state) {
  const std::unique_ptr<ClipTokenizer> tokenizer = MakeTokenizer(1 << 16);
  (void)tokenizer->EncodeForModel(kTypicalPrompt);
  for (auto _ : state) {
    auto input = tokenizer->EncodeForModel(kTypicalPrompt);
    benchmark::DoNotOptimize(input);
  }
}

// Loading vocab.json + merges.txt (model start-up).
void BM_Create(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(MakeTokenizer(1 << 16));
}

BENCHMARK(BM_EncodeTypicalWarm)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_EncodeTypicalCold)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_EncodeLongWarm)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_EncodeLongCold)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_EncodeForModelTypicalWarm)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Create)->Unit(benchmark::kMillisecond)->Iterations(5);

}  // namespace
}  // namespace dmdserve

BENCHMARK_MAIN();
