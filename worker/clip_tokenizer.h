// ClipTokenizer: OpenAI CLIP's byte-level BPE tokenizer, exact to its reference implementation.
//
// Loads a Hugging Face `vocab.json` + `merges.txt` pair and encodes text the way CLIP's
// simple_tokenizer.py does with its ftfy step left out (see docs/TOKENIZER.md):
//   1. HTML character references are unescaped twice (Python's html.unescape rules, all HTML5
//      named references), the text is stripped, runs of whitespace become one space, and it is
//      lower-cased with Python's str.lower() rules (full mapping, Greek final sigma).
//   2. It is split with the semantics of CLIP's regex
//      `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//      (case-insensitive; letter/number classes from utf8proc).
//   3. Each piece's UTF-8 bytes are mapped to GPT-2's printable byte alphabet and merged by BPE
//      with the `</w>` end-of-word marker, in merges.txt rank order. A piece that is exactly
//      `<|startoftext|>` or `<|endoftext|>` becomes that special token's id.
//   A pad token other than those two (SDXL's second tokenizer pads with "!") is a special token
//   too, as in Hugging Face's CLIPTokenizer: the cleaned text is split at each of its occurrences,
//   each becomes the pad id on its own, and the pieces between are encoded as above ("boot!!" ->
//   boot</w>, pad, pad; CLIP's own tokenizer gives boot</w>, !!</w>).
//
// Example:
//   ClipTokenizer::Options options;
//   options.vocab_path = ".../vocab.json";
//   options.merges_path = ".../merges.txt";
//   auto tokenizer = ClipTokenizer::Create(options);
//   auto input = (*tokenizer)->EncodeForModel("a photo of a cat");  // input->input_ids: 77 ids
//
// Ownership: the tokenizer owns its tables and its word cache; callers own the results.
// Thread safety: every const method may be called from any number of threads at once; the word
// cache is sharded and each shard is guarded by its own mutex.
#ifndef DMDSERVE_WORKER_CLIP_TOKENIZER_H_
#define DMDSERVE_WORKER_CLIP_TOKENIZER_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace dmdserve {

class ClipTokenizer {
 public:
  struct Options {
    // Hugging Face vocab.json: a JSON object mapping token string -> id (ids >= 0, distinct).
    std::string vocab_path;
    // Hugging Face merges.txt: one "left right" merge per line, best rank first; an optional
    // first line starting with "#version" is skipped. Every merge is used.
    std::string merges_path;
    // Token strings (looked up in vocab.json) put before the ids, after them, and used as
    // padding by EncodeForModel. Defaults are CLIP's / SD1.5's.
    std::string bos_token = "<|startoftext|>";
    std::string eos_token = "<|endoftext|>";
    std::string pad_token = "<|endoftext|>";  // SD1.5 pads with EOS
    // Most words whose BPE result is kept in memory (rounded up to a multiple of 16, the shard
    // count; a full shard is cleared); 0 disables the cache. Words longer than
    // kMaxCachedWordBytes are never cached. Default 65536.
    size_t word_cache_capacity = 1 << 16;
  };

  struct ModelInput {
    std::vector<int32_t> input_ids;  // exactly max_length: BOS, ids[:max_length-2], EOS, pad...
    std::vector<int32_t> ids;        // all ids of the text (no BOS/EOS, not truncated)
    int truncated_tokens = 0;        // ids.size() - kept ids
  };

  // Longest word (in UTF-8 bytes, after clean-up) whose BPE result is cached.
  static constexpr size_t kMaxCachedWordBytes = 64;

  // Reads and validates both files. INVALID_ARGUMENT names the file, line or token at fault
  // (unreadable file, bad JSON, malformed merge, a merge part or result missing from the vocab,
  // merges that use a token before the line that creates it, special token not in the vocab).
  static absl::StatusOr<std::unique_ptr<ClipTokenizer>> Create(const Options& options);

  ClipTokenizer(const ClipTokenizer&) = delete;
  ClipTokenizer& operator=(const ClipTokenizer&) = delete;

  // All ids of `text` (no BOS/EOS). INVALID_ARGUMENT, naming the byte offset, if `text` is not
  // valid UTF-8 (overlong forms, surrogates and code points above U+10FFFF are invalid).
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const;

  // Encode() laid out for a text encoder with `max_length` positions: BOS, as many ids as fit,
  // EOS, then padding. INVALID_ARGUMENT if max_length < 2 or the text is not valid UTF-8.
  absl::StatusOr<ModelInput> EncodeForModel(std::string_view text, int max_length = 77) const;

  // The vocab.json string of `id` (byte-level alphabet, e.g. "cat</w>"); "" for an unknown id.
  const std::string& TokenString(int32_t id) const;

  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t pad_id() const { return pad_id_; }
  // One more than the largest id in vocab.json (49408 for CLIP); every id produced is below it.
  size_t vocab_size() const { return id_to_token_.size(); }

 private:
  // A merge of the adjacent pair (left, right) into `result`; lower rank merges first.
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  // One shard of the word cache.
  struct CacheShard {
    absl::Mutex mu;
    absl::flat_hash_map<std::string, std::vector<int32_t>> words ABSL_GUARDED_BY(mu);
  };
  static constexpr size_t kCacheShards = 16;

  ClipTokenizer() = default;

  // The steps of Create(), in order; each returns INVALID_ARGUMENT naming the file, line or token
  // at fault.
  // Fills token_to_id_ and id_to_token_ from vocab.json at `path`.
  absl::Status ReadVocab(const std::string& path);
  // Fills byte_ids_ and byte_end_ids_ from the vocab (read from `vocab_path`, named in errors).
  absl::Status BuildByteTables(const std::string& vocab_path);
  // Fills merges_ from merges.txt at `path`, rank = line order. Merging the lowest rank first
  // (Bpe) reproduces CLIP's round-by-round loop when no merge uses a token that a later line
  // creates, which is checked.
  absl::Status ReadMerges(const std::string& path);
  // Adds the merge `left_token right_token` of the line `where` (for errors) to merges_.
  // `used_as_part`: the ids the merges so far use as parts; updated.
  absl::Status AddMerge(absl::string_view left_token, absl::string_view right_token,
                        const std::string& where, absl::flat_hash_set<int32_t>* used_as_part);
  // Sets bos_id_, eos_id_, pad_id_ from the Options' token strings and fills special_ids_.
  absl::Status FindSpecialTokens(const Options& options);
  // The id of `token` in vocab.json, or -1.
  int32_t FindId(const std::string& token) const;

  // Appends the ids of cleaned text (steps 2 and 3 of the file comment).
  void EncodeCleaned(const std::u32string& cleaned, std::vector<int32_t>* ids) const;
  // Appends the ids of one pre-tokenized word (UTF-8, already cleaned and lower-cased).
  void EncodeWord(std::string_view word, std::vector<int32_t>* ids) const;
  // Byte-level BPE of `word`, without the cache.
  std::vector<int32_t> Bpe(std::string_view word) const;
  const Merge* FindMerge(int32_t left, int32_t right) const;

  absl::flat_hash_map<std::string, int32_t> token_to_id_;
  std::vector<std::string> id_to_token_;         // "" where vocab.json has no token for an id
  absl::flat_hash_map<uint64_t, Merge> merges_;  // key: (uint64_t(left) << 32) | right
  std::array<int32_t, 256> byte_ids_{};          // id of the symbol for each byte
  std::array<int32_t, 256> byte_end_ids_{};      // id of that symbol + "</w>"
  absl::flat_hash_map<std::string, int32_t> special_ids_;  // "<|startoftext|>", "<|endoftext|>"
  int32_t bos_id_ = 0;
  int32_t eos_id_ = 0;
  int32_t pad_id_ = 0;
  // The pad token's text when it is not `<|startoftext|>` / `<|endoftext|>`: it splits the text.
  std::u32string pad_text_;
  size_t shard_capacity_ = 0;  // 0: cache disabled
  mutable std::array<CacheShard, kCacheShards> cache_;
};

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_CLIP_TOKENIZER_H_
