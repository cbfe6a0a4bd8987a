#include "worker/clip_tokenizer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <queue>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/hash/hash.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "worker/text_cleanup.h"

namespace dmdserve {
namespace {

using text_cleanup::AppendUtf8;
using text_cleanup::IsLetter;
using text_cleanup::IsNumber;
using text_cleanup::IsRegexSpace;

constexpr char kEndOfWord[] = "</w>";
constexpr std::string_view kSpecialTokens[] = {"<|startoftext|>", "<|endoftext|>"};
// Largest id accepted in vocab.json (bounds the id -> token table).
constexpr int64_t kMaxVocabId = (1 << 24) - 1;

// ---- Pre-tokenization ----

// CLIP's regex is compiled with IGNORECASE, under which the `regex` module matches U+0345
// (COMBINING GREEK YPOGEGRAMMENI, whose case partner is a letter) with none of its classes:
// it is never part of a token.
constexpr char32_t kYpogegrammeni = 0x345;
// ... and LATIN SMALL LETTER LONG S matches 's' (in "'s" and "<|startoftext|>").
bool MatchesS(char32_t cp) { return cp == 's' || cp == 0x17F; }

// Length of the special-token literal CLIP's regex matches at s[i], or 0.
size_t MatchSpecialLiteral(const std::u32string& s, size_t i) {
  for (std::string_view literal : kSpecialTokens) {
    if (s.size() - i < literal.size()) continue;
    size_t k = 0;
    while (k < literal.size() &&
           (literal[k] == 's' ? MatchesS(s[i + k]) : s[i + k] == char32_t(literal[k]))) {
      ++k;
    }
    if (k == literal.size()) return k;
  }
  return 0;
}

// Length of the contraction ('s 't 're 've 'm 'll 'd) CLIP's regex matches at s[i], or 0.
size_t MatchContraction(const std::u32string& s, size_t i) {
  if (s[i] != '\'' || i + 1 >= s.size()) return 0;
  const char32_t a = s[i + 1];
  if (MatchesS(a) || a == 't' || a == 'm' || a == 'd') return 2;
  if (i + 2 >= s.size()) return 0;
  const char32_t b = s[i + 2];
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

// Calls emit(begin, end) for each match of CLIP's pattern in `s`, in order.
template <typename Emit>
void PreTokenize(const std::u32string& s, Emit emit) {
  const auto is_other = [](char32_t c) {
    return !IsRegexSpace(c) && c != kYpogegrammeni && !IsLetter(c) && !IsNumber(c);
  };
  size_t i = 0;
  while (i < s.size()) {
    size_t length = MatchSpecialLiteral(s, i);
    if (length == 0) length = MatchContraction(s, i);
    if (length == 0) {
      if (IsLetter(s[i])) {
        while (i + length < s.size() && IsLetter(s[i + length])) ++length;
      } else if (IsNumber(s[i])) {
        length = 1;
      } else if (is_other(s[i])) {
        while (i + length < s.size() && is_other(s[i + length])) ++length;
      } else {
        ++i;  // whitespace or U+0345: not part of any token
        continue;
      }
    }
    emit(i, i + length);
    i += length;
  }
}

// GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves; the 68 other bytes take
// the code points 256, 257, ... in byte order.
std::array<char32_t, 256> ByteAlphabet() {
  std::array<char32_t, 256> alphabet{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    alphabet[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return alphabet;
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* field) {
  if (path.empty()) return absl::InvalidArgumentError(absl::StrCat("Options.", field, " is empty"));
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot open ", field, " '", path, "': ", std::strerror(errno)));
  }
  std::string contents{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (in.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read ", field, " '", path, "'"));
  }
  return contents;
}

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// The largest id of `vocab` (a JSON object read from `path`), after checking that every id is
// an integer in [0, kMaxVocabId].
absl::StatusOr<int64_t> MaxVocabId(const nlohmann::json& vocab, const std::string& path) {
  int64_t max_id = -1;
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > kMaxVocabId) {
      return absl::InvalidArgumentError(
          absl::StrCat("vocab_path '", path, "': token '", token, "' has id ", id.dump(),
                       "; ids must be integers in [0, ", kMaxVocabId, "]"));
    }
    max_id = std::max(max_id, id.get<int64_t>());
  }
  return max_id;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ClipTokenizer>> ClipTokenizer::Create(const Options& options) {
  auto tokenizer = std::unique_ptr<ClipTokenizer>(new ClipTokenizer());
  absl::Status status = tokenizer->ReadVocab(options.vocab_path);
  if (status.ok()) status = tokenizer->BuildByteTables(options.vocab_path);
  if (status.ok()) status = tokenizer->ReadMerges(options.merges_path);
  if (status.ok()) status = tokenizer->FindSpecialTokens(options);
  if (!status.ok()) return status;
  tokenizer->shard_capacity_ = (options.word_cache_capacity + kCacheShards - 1) / kCacheShards;
  return tokenizer;
}

absl::Status ClipTokenizer::ReadVocab(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path, "vocab_path");
  if (!text.ok()) return text.status();
  const nlohmann::json vocab = nlohmann::json::parse(*text, nullptr, false);
  if (vocab.is_discarded() || !vocab.is_object() || vocab.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("vocab_path '", path, "' is not a JSON object of token -> id"));
  }
  absl::StatusOr<int64_t> max_id = MaxVocabId(vocab, path);
  if (!max_id.ok()) return max_id.status();
  id_to_token_.resize(*max_id + 1);
  for (const auto& [token, id_json] : vocab.items()) {
    const auto id = id_json.get<int32_t>();
    if (!id_to_token_[id].empty() || token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("vocab_path '", path, "': id ", id, " is used twice or by an empty token"));
    }
    id_to_token_[id] = token;
    token_to_id_[token] = id;
  }
  return absl::OkStatus();
}

int32_t ClipTokenizer::FindId(const std::string& token) const {
  const auto it = token_to_id_.find(token);
  return it == token_to_id_.end() ? -1 : it->second;
}

absl::Status ClipTokenizer::BuildByteTables(const std::string& vocab_path) {
  const std::array<char32_t, 256> alphabet = ByteAlphabet();
  for (int b = 0; b < 256; ++b) {
    std::string symbol;
    AppendUtf8(alphabet[b], &symbol);
    byte_ids_[b] = FindId(symbol);
    byte_end_ids_[b] = FindId(absl::StrCat(symbol, kEndOfWord));
    if (byte_ids_[b] < 0 || byte_end_ids_[b] < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("vocab_path '%s' lacks '%s' or '%s%s' (the symbol of byte 0x%02X)",
                          vocab_path, symbol, symbol, kEndOfWord, b));
    }
  }
  return absl::OkStatus();
}

absl::Status ClipTokenizer::ReadMerges(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path, "merges_path");
  if (!text.ok()) return text.status();
  absl::flat_hash_set<int32_t> used_as_part;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    ++line_number;
    if (line_number == 1 && absl::StartsWith(line, "#version")) continue;
    const std::vector<absl::string_view> parts =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (parts.empty()) continue;
    const std::string where =
        absl::StrCat("merges_path '", path, "' line ", line_number, " '", line, "'");
    if (parts.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": expected two tokens"));
    }
    if (absl::Status status = AddMerge(parts[0], parts[1], where, &used_as_part); !status.ok()) {
      return status;
    }
  }
  return absl::OkStatus();
}

absl::Status ClipTokenizer::AddMerge(absl::string_view left_token, absl::string_view right_token,
                                     const std::string& where,
                                     absl::flat_hash_set<int32_t>* used_as_part) {
  const int32_t left = FindId(std::string(left_token));
  const int32_t right = FindId(std::string(right_token));
  const int32_t result = FindId(absl::StrCat(left_token, right_token));
  if (left < 0 || right < 0 || result < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": a part or the merged token is not in vocab.json"));
  }
  if (used_as_part->contains(result)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": creates a token that an earlier merge already uses"));
  }
  const auto rank = static_cast<int32_t>(merges_.size());  // line order
  if (!merges_.emplace(PairKey(left, right), Merge{rank, result}).second) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": duplicate merge"));
  }
  used_as_part->insert(left);
  used_as_part->insert(right);
  return absl::OkStatus();
}

absl::Status ClipTokenizer::FindSpecialTokens(const Options& options) {
  const std::pair<const std::string*, int32_t*> specials[] = {{&options.bos_token, &bos_id_},
                                                              {&options.eos_token, &eos_id_},
                                                              {&options.pad_token, &pad_id_}};
  for (const auto& [token, id] : specials) {
    *id = FindId(*token);
    if (*id < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "special token '", *token, "' is not in vocab_path '", options.vocab_path, "'"));
    }
  }
  for (std::string_view literal : kSpecialTokens) {
    if (const int32_t id = FindId(std::string(literal)); id >= 0) {
      special_ids_.emplace(literal, id);
    }
  }
  const bool pad_is_special =
      std::find(std::begin(kSpecialTokens), std::end(kSpecialTokens), options.pad_token) !=
      std::end(kSpecialTokens);
  if (!pad_is_special) {
    std::u32string pad;
    if (absl::Status s = text_cleanup::DecodeUtf8(options.pad_token, &pad); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("pad_token '", options.pad_token, "': ", s.message()));
    }
    pad_text_ = std::move(pad);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> ClipTokenizer::Encode(std::string_view text) const {
  std::u32string decoded;
  if (absl::Status status = text_cleanup::DecodeUtf8(text, &decoded); !status.ok()) return status;
  const std::u32string cleaned = text_cleanup::CleanUp(std::move(decoded));
  std::vector<int32_t> ids;
  if (pad_text_.empty()) {
    EncodeCleaned(cleaned, &ids);
    return ids;
  }
  // The pad token stands for itself: encode the text between its occurrences.
  size_t begin = 0;
  for (size_t at = cleaned.find(pad_text_); at != std::u32string::npos;
       at = cleaned.find(pad_text_, begin)) {
    EncodeCleaned(cleaned.substr(begin, at - begin), &ids);
    ids.push_back(pad_id_);
    begin = at + pad_text_.size();
  }
  EncodeCleaned(cleaned.substr(begin), &ids);
  return ids;
}

void ClipTokenizer::EncodeCleaned(const std::u32string& cleaned, std::vector<int32_t>* ids) const {
  std::string word;
  PreTokenize(cleaned, [&](size_t begin, size_t end) {
    word.clear();
    for (size_t i = begin; i < end; ++i) AppendUtf8(cleaned[i], &word);
    EncodeWord(word, ids);
  });
}

absl::StatusOr<ClipTokenizer::ModelInput> ClipTokenizer::EncodeForModel(std::string_view text,
                                                                        int max_length) const {
  if (max_length < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_length must be >= 2 (room for BOS and EOS), got ", max_length));
  }
  absl::StatusOr<std::vector<int32_t>> ids = Encode(text);
  if (!ids.ok()) return ids.status();
  ModelInput input;
  input.ids = *std::move(ids);
  const size_t kept = std::min(input.ids.size(), static_cast<size_t>(max_length - 2));
  input.truncated_tokens = static_cast<int>(input.ids.size() - kept);
  input.input_ids.reserve(max_length);
  input.input_ids.push_back(bos_id_);
  input.input_ids.insert(input.input_ids.end(), input.ids.begin(), input.ids.begin() + kept);
  input.input_ids.push_back(eos_id_);
  input.input_ids.resize(max_length, pad_id_);
  return input;
}

const std::string& ClipTokenizer::TokenString(int32_t id) const {
  static const std::string* const kEmpty = new std::string();
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) return *kEmpty;
  return id_to_token_[id];
}

void ClipTokenizer::EncodeWord(std::string_view word, std::vector<int32_t>* ids) const {
  // Debian's absl::string_view is its own type, not std::string_view.
  const absl::string_view key(word.data(), word.size());
  if (word.front() == '<') {
    if (const auto it = special_ids_.find(key); it != special_ids_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  if (shard_capacity_ == 0 || word.size() > kMaxCachedWordBytes) {
    const std::vector<int32_t> word_ids = Bpe(word);
    ids->insert(ids->end(), word_ids.begin(), word_ids.end());
    return;
  }
  CacheShard& shard = cache_[absl::Hash<absl::string_view>()(key) % kCacheShards];
  {
    absl::ReaderMutexLock lock(&shard.mu);
    if (const auto it = shard.words.find(key); it != shard.words.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> word_ids = Bpe(word);
  ids->insert(ids->end(), word_ids.begin(), word_ids.end());
  absl::MutexLock lock(&shard.mu);
  if (shard.words.size() >= shard_capacity_) shard.words.clear();  // bounded: start over
  shard.words.emplace(key, std::move(word_ids));
}

const ClipTokenizer::Merge* ClipTokenizer::FindMerge(int32_t left, int32_t right) const {
  const auto it = merges_.find(PairKey(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

// Merges the lowest-ranked adjacent pair first, leftmost first among equal pairs: with merges
// validated in Create(), this equals CLIP's loop (merge every occurrence of the best pair, left
// to right, then look again) in O(n log n).
std::vector<int32_t> ClipTokenizer::Bpe(std::string_view word) const {
  struct Symbol {
    int32_t id;  // -1: merged into the symbol on its left
    int32_t prev;
    int32_t next;
  };
  struct Candidate {
    int32_t rank;
    int32_t left;  // position of the left symbol
    int32_t left_id;
    int32_t right_id;
    int32_t result;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  const auto n = static_cast<int32_t>(word.size());
  std::vector<Symbol> symbols(n);
  for (int32_t i = 0; i < n; ++i) {
    const auto byte = static_cast<unsigned char>(word[i]);
    symbols[i] = {i + 1 < n ? byte_ids_[byte] : byte_end_ids_[byte], i - 1, i + 1 < n ? i + 1 : -1};
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  const auto push = [&](int32_t left) {
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    if (const Merge* merge = FindMerge(symbols[left].id, symbols[right].id)) {
      queue.push({merge->rank, left, symbols[left].id, symbols[right].id, merge->result});
    }
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& left = symbols[c.left];
    if (left.id != c.left_id || left.next < 0 || symbols[left.next].id != c.right_id) continue;
    Symbol& right = symbols[left.next];
    left.id = c.result;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = c.left;
    right.id = -1;
    if (left.prev >= 0) push(left.prev);
    push(c.left);
  }
  std::vector<int32_t> ids;
  for (int32_t i = 0; i >= 0; i = symbols[i].next) ids.push_back(symbols[i].id);
  return ids;
}

}  // namespace dmdserve
