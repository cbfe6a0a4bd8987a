// libFuzzer target for ClipTokenizer: arbitrary bytes go to Encode() and EncodeForModel().
//
// Invariants checked (a violation aborts, which libFuzzer reports as a crash):
// - the input is rejected exactly when utf8proc finds it invalid UTF-8, with INVALID_ARGUMENT
//   naming the offset of the first bad sequence, and EncodeForModel() agrees;
// - otherwise every id is in [0, vocab_size) and has a token string, Encode() is deterministic
//   (the second call is served by the word cache) and EncodeForModel() returns exactly
//   max_length ids laid out as BOS, ids[:max_length-2], EOS, padding.
// ASan/UBSan (see CMakeLists.txt) catch memory and undefined-behaviour errors on the way.
#include <utf8proc.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "tests/fuzz/fuzz_check.h"
#include "worker/clip_tokenizer.h"

namespace {

const dmdserve::ClipTokenizer& Tokenizer() {
  static const dmdserve::ClipTokenizer* const tokenizer = [] {
    dmdserve::ClipTokenizer::Options options;
    options.vocab_path = DMDSERVE_VOCAB_DIR "/vocab.json";
    options.merges_path = DMDSERVE_VOCAB_DIR "/merges.txt";
    options.word_cache_capacity = 4096;  // small, so that eviction is exercised too
    auto created = dmdserve::ClipTokenizer::Create(options);
    if (!created.ok()) {
      std::fprintf(stderr, "%s\n", created.status().ToString().c_str());
      std::abort();
    }
    return created->release();
  }();
  return *tokenizer;
}

// Offset of the first invalid UTF-8 sequence according to utf8proc, or -1.
long FirstInvalidUtf8Offset(std::string_view text) {
  size_t offset = 0;
  while (offset < text.size()) {
    utf8proc_int32_t cp;
    const utf8proc_ssize_t length =
        utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(text.data() + offset),
                         static_cast<utf8proc_ssize_t>(text.size() - offset), &cp);
    if (length <= 0) return static_cast<long>(offset);
    offset += static_cast<size_t>(length);
  }
  return -1;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const dmdserve::ClipTokenizer& tokenizer = Tokenizer();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const int max_length = 2 + static_cast<int>(size % 90);  // 2..91, including 77

  const auto ids = tokenizer.Encode(text);
  const auto input = tokenizer.EncodeForModel(text, max_length);
  const long bad_offset = FirstInvalidUtf8Offset(text);
  if (bad_offset >= 0) {
    const std::string where = "byte offset " + std::to_string(bad_offset) + ":";
    FUZZ_CHECK(ids.status().code() == absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(ids.status().message().find(where) != absl::string_view::npos);
    FUZZ_CHECK(input.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  FUZZ_CHECK(ids.ok());
  FUZZ_CHECK(input.ok());
  for (const int32_t id : *ids) {
    FUZZ_CHECK(id >= 0 && static_cast<size_t>(id) < tokenizer.vocab_size());
    FUZZ_CHECK(!tokenizer.TokenString(id).empty());
  }
  const auto again = tokenizer.Encode(text);
  FUZZ_CHECK(again.ok() && *again == *ids);

  FUZZ_CHECK(input->ids == *ids);
  FUZZ_CHECK(input->input_ids.size() == static_cast<size_t>(max_length));
  const size_t kept = std::min(ids->size(), static_cast<size_t>(max_length - 2));
  FUZZ_CHECK(input->truncated_tokens == static_cast<int>(ids->size() - kept));
  FUZZ_CHECK(input->input_ids.front() == tokenizer.bos_id());
  for (size_t i = 0; i < kept; ++i) FUZZ_CHECK(input->input_ids[1 + i] == (*ids)[i]);
  FUZZ_CHECK(input->input_ids[1 + kept] == tokenizer.eos_id());
  for (size_t i = 2 + kept; i < input->input_ids.size(); ++i) {
    FUZZ_CHECK(input->input_ids[i] == tokenizer.pad_id());
  }
  return 0;
}
