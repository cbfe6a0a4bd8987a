#include "worker/clip_tokenizer.h"

#include <utf8proc.h>

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
#include "worker/html_entities.h"

namespace dmdserve {
namespace {

using text_cleanup::FindHtmlEntity;
using text_cleanup::HtmlEntity;

constexpr char kEndOfWord[] = "</w>";
constexpr std::string_view kSpecialTokens[] = {"<|startoftext|>", "<|endoftext|>"};
// Largest id accepted in vocab.json (bounds the id -> token table).
constexpr int64_t kMaxVocabId = (1 << 24) - 1;

// ---- UTF-8 ----

absl::Status InvalidUtf8(size_t offset, const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat("text is not valid UTF-8 at byte offset ", offset, ": ", what));
}

// Strict decoding: rejects stray continuation bytes, truncated sequences, overlong forms,
// surrogates and code points above U+10FFFF.
absl::Status DecodeUtf8(std::string_view text, std::u32string* out) {
  out->clear();
  out->reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    if (lead < 0x80) {
      out->push_back(lead);
      ++i;
      continue;
    }
    size_t length;
    char32_t cp;
    char32_t min_cp;
    if (lead < 0xC0) {
      return InvalidUtf8(i, absl::StrFormat("unexpected continuation byte 0x%02X", lead));
    } else if (lead < 0xE0) {
      length = 2, cp = lead & 0x1F, min_cp = 0x80;
    } else if (lead < 0xF0) {
      length = 3, cp = lead & 0x0F, min_cp = 0x800;
    } else if (lead < 0xF8) {
      length = 4, cp = lead & 0x07, min_cp = 0x10000;
    } else {
      return InvalidUtf8(i, absl::StrFormat("invalid byte 0x%02X", lead));
    }
    for (size_t k = 1; k < length; ++k) {
      if (i + k >= text.size()) {
        return InvalidUtf8(i, absl::StrCat("truncated ", length, "-byte sequence at end of text"));
      }
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xC0) != 0x80) {
        return InvalidUtf8(
            i, absl::StrFormat("truncated %d-byte sequence (byte 0x%02X follows)", length, next));
      }
      cp = (cp << 6) | (next & 0x3F);
    }
    if (cp < min_cp) {
      return InvalidUtf8(i, absl::StrFormat("overlong encoding of U+%04X", cp));
    }
    if (cp >= 0xD800 && cp <= 0xDFFF) {
      return InvalidUtf8(i, absl::StrFormat("surrogate code point U+%04X", cp));
    }
    if (cp > 0x10FFFF) return InvalidUtf8(i, absl::StrFormat("code point U+%X > U+10FFFF", cp));
    out->push_back(cp);
    i += length;
  }
  return absl::OkStatus();
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// ---- Character classes (Unicode data from utf8proc) ----

utf8proc_category_t Category(char32_t cp) {
  return utf8proc_category(static_cast<utf8proc_int32_t>(cp));
}

bool IsLetter(char32_t cp) {
  const utf8proc_category_t c = Category(cp);
  return c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO;
}

bool IsNumber(char32_t cp) {
  const utf8proc_category_t c = Category(cp);
  return c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO;
}

// `\s` of the `regex` module CLIP uses: the Unicode White_Space property.
bool IsRegexSpace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// Python's str.isspace(), used by str.strip(): White_Space plus U+001C..U+001F.
bool IsPythonSpace(char32_t cp) { return IsRegexSpace(cp) || (cp >= 0x1C && cp <= 0x1F); }

// CLIP's regex is compiled with IGNORECASE, under which the `regex` module matches U+0345
// (COMBINING GREEK YPOGEGRAMMENI, whose case partner is a letter) with none of its classes:
// it is never part of a token.
constexpr char32_t kYpogegrammeni = 0x345;
// ... and LATIN SMALL LETTER LONG S matches 's' (in "'s" and "<|startoftext|>").
bool MatchesS(char32_t cp) { return cp == 's' || cp == 0x17F; }

// Unicode Case_Ignorable, for the final-sigma rule of Python's str.lower().
bool IsCaseIgnorable(char32_t cp) {
  switch (Category(cp)) {
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_SK:
      return true;
    default:
      break;
  }
  // Word_Break MidLetter, MidNumLet and Single_Quote characters outside those categories.
  static constexpr char32_t kWordBreakMid[] = {0x27,   0x2E,   0x3A,   0xB7,   0x387,  0x55F,
                                               0x5F4,  0x2018, 0x2019, 0x2024, 0x2027, 0xFE13,
                                               0xFE52, 0xFE55, 0xFF07, 0xFF0E, 0xFF1A};
  return std::binary_search(std::begin(kWordBreakMid), std::end(kWordBreakMid), cp);
}

// Unicode Cased (Lu, Ll, Lt, Other_Lowercase, Other_Uppercase). Other_* characters that are
// also Case_Ignorable (modifier letters, U+0345) are left out: the final-sigma rule never asks.
bool IsCased(char32_t cp) {
  const utf8proc_category_t c = Category(cp);
  if (c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT) {
    return true;
  }
  return cp == 0xAA || cp == 0xBA || (cp >= 0x2160 && cp <= 0x217F) ||
         (cp >= 0x24B6 && cp <= 0x24E9) || (cp >= 0x1F130 && cp <= 0x1F149) ||
         (cp >= 0x1F150 && cp <= 0x1F169) || (cp >= 0x1F170 && cp <= 0x1F189);
}

// ---- Clean-up: HTML unescape, whitespace, lower case ----

// Python's html.unescape() for a numeric reference: Windows-1252 remapping of 0x80..0x9F,
// U+FFFD for NUL, surrogates and out-of-range values, nothing for control and non-characters.
void AppendNumericReference(char32_t value, std::u32string* out) {
  static constexpr char32_t kC1Remap[32] = {
      0x20AC, 0x81,   0x201A, 0x192,  0x201E, 0x2026, 0x2020, 0x2021, 0x2C6,  0x2030, 0x160,
      0x2039, 0x152,  0x8D,   0x17D,  0x8F,   0x90,   0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
      0x2013, 0x2014, 0x2DC,  0x2122, 0x161,  0x203A, 0x153,  0x9D,   0x17E,  0x178};
  if (value == 0) {
    out->push_back(0xFFFD);
  } else if (value == 0x0D) {
    out->push_back(0x0D);
  } else if (value >= 0x80 && value <= 0x9F) {
    out->push_back(kC1Remap[value - 0x80]);
  } else if ((value >= 0xD800 && value <= 0xDFFF) || value > 0x10FFFF) {
    out->push_back(0xFFFD);
  } else if ((value >= 0x01 && value <= 0x08) || value == 0x0B ||
             (value >= 0x0E && value <= 0x1F) || value == 0x7F ||
             (value >= 0xFDD0 && value <= 0xFDEF) || (value & 0xFFFE) == 0xFFFE) {
    // Dropped.
  } else {
    out->push_back(value);
  }
}

bool IsAsciiDigit(char32_t c) { return c >= '0' && c <= '9'; }
bool IsAsciiHexDigit(char32_t c) {
  return IsAsciiDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}
int HexValue(char32_t c) { return IsAsciiDigit(c) ? c - '0' : (c | 0x20) - 'a' + 10; }

// Replaces the character reference whose text starts at s[p] (just after '&') like Python's
// html.unescape(), which matches `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)`.
// Returns how many characters after the '&' were consumed; 0 leaves the '&' as it is.
size_t ReplaceCharacterReference(const std::u32string& s, size_t p, std::u32string* out) {
  const size_t n = s.size();
  if (p < n && s[p] == '#') {
    size_t q = p + 1;
    int base = 10;
    if (q + 1 < n && (s[q] == 'x' || s[q] == 'X') && IsAsciiHexDigit(s[q + 1])) {
      base = 16;
      ++q;
    } else if (q >= n || !IsAsciiDigit(s[q])) {
      return 0;
    }
    char32_t value = 0;  // saturates just above U+10FFFF
    for (; q < n && (base == 16 ? IsAsciiHexDigit(s[q]) : IsAsciiDigit(s[q])); ++q) {
      value = std::min<char32_t>(value * base + HexValue(s[q]), 0x110000);
    }
    if (q < n && s[q] == ';') ++q;
    AppendNumericReference(value, out);
    return q - p;
  }
  // A named reference: up to 32 characters, then an optional ';'.
  size_t end = p;
  while (end < n && end - p < 32) {
    const char32_t c = s[end];
    if (c == '\t' || c == '\n' || c == '\f' || c == ' ' || c == '<' || c == '&' || c == '#' ||
        c == ';') {
      break;
    }
    ++end;
  }
  if (end == p) return 0;
  if (end < n && s[end] == ';') ++end;
  // Entity names are ASCII: only the ASCII prefix of the candidate can match.
  std::string ascii;
  for (size_t k = p; k < end && s[k] < 0x80; ++k) ascii.push_back(static_cast<char>(s[k]));
  const size_t length = end - p;
  if (ascii.size() == length) {
    if (const HtmlEntity* entity = FindHtmlEntity(ascii)) {
      out->push_back(entity->first);
      if (entity->second != 0) out->push_back(entity->second);
      return length;
    }
  }
  // Else the longest prefix (of at least 2 characters) that names a reference.
  for (size_t x = std::min(ascii.size(), length - 1); x >= 2; --x) {
    if (const HtmlEntity* entity = FindHtmlEntity(std::string_view(ascii).substr(0, x))) {
      out->push_back(entity->first);
      if (entity->second != 0) out->push_back(entity->second);
      out->append(s, p + x, length - x);
      return length;
    }
  }
  return 0;
}

std::u32string HtmlUnescape(std::u32string s) {
  if (s.find(U'&') == std::u32string::npos) return s;
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    if (s[i] == '&') {
      if (const size_t consumed = ReplaceCharacterReference(s, i + 1, &out); consumed > 0) {
        i += 1 + consumed;
        continue;
      }
    }
    out.push_back(s[i++]);
  }
  return out;
}

// Every run of White_Space becomes one ' ', then Python-whitespace is stripped from both ends.
// (CLIP strips before this too; that first strip cannot change the result.)
std::u32string CollapseWhitespace(const std::u32string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    if (IsRegexSpace(s[i])) {
      out.push_back(' ');
      while (i < s.size() && IsRegexSpace(s[i])) ++i;
    } else {
      out.push_back(s[i++]);
    }
  }
  size_t end = out.size();
  while (end > 0 && IsPythonSpace(out[end - 1])) --end;
  out.resize(end);
  size_t begin = 0;
  while (begin < out.size() && IsPythonSpace(out[begin])) ++begin;
  out.erase(0, begin);
  return out;
}

// Python's str.lower(): utf8proc's simple mapping, plus the full mapping of U+0130 (i + U+0307)
// and the final sigma rule: U+03A3 becomes U+03C2 after a cased letter when no cased letter
// follows (Case_Ignorable characters are skipped in both directions).
std::u32string ToLower(const std::u32string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    const char32_t cp = s[i];
    if (cp == 0x130) {
      out.push_back('i');
      out.push_back(0x307);
    } else if (cp == 0x3A3) {
      size_t before = i;
      while (before > 0 && IsCaseIgnorable(s[before - 1])) --before;
      size_t after = i + 1;
      while (after < s.size() && IsCaseIgnorable(s[after])) ++after;
      const bool final_sigma =
          before > 0 && IsCased(s[before - 1]) && (after == s.size() || !IsCased(s[after]));
      out.push_back(final_sigma ? 0x3C2 : 0x3C3);
    } else {
      out.push_back(static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp))));
    }
  }
  return out;
}

// ---- Pre-tokenization ----

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

}  // namespace

absl::StatusOr<std::unique_ptr<ClipTokenizer>> ClipTokenizer::Create(const Options& options) {
  auto tokenizer = std::unique_ptr<ClipTokenizer>(new ClipTokenizer());
  ClipTokenizer& t = *tokenizer;

  // vocab.json
  absl::StatusOr<std::string> vocab_text = ReadFile(options.vocab_path, "vocab_path");
  if (!vocab_text.ok()) return vocab_text.status();
  const nlohmann::json vocab = nlohmann::json::parse(*vocab_text, nullptr, false);
  if (vocab.is_discarded() || !vocab.is_object() || vocab.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("vocab_path '", options.vocab_path, "' is not a JSON object of token -> id"));
  }
  int64_t max_id = -1;
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > kMaxVocabId) {
      return absl::InvalidArgumentError(
          absl::StrCat("vocab_path '", options.vocab_path, "': token '", token, "' has id ",
                       id.dump(), "; ids must be integers in [0, ", kMaxVocabId, "]"));
    }
    max_id = std::max(max_id, id.get<int64_t>());
  }
  t.id_to_token_.resize(max_id + 1);
  for (const auto& [token, id_json] : vocab.items()) {
    const auto id = id_json.get<int32_t>();
    if (!t.id_to_token_[id].empty() || token.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("vocab_path '", options.vocab_path, "': id ",
                                                     id, " is used twice or by an empty token"));
    }
    t.id_to_token_[id] = token;
    t.token_to_id_[token] = id;
  }
  const auto find_id = [&t](const std::string& token) -> int32_t {
    const auto it = t.token_to_id_.find(token);
    return it == t.token_to_id_.end() ? -1 : it->second;
  };

  // The byte alphabet, alone and at the end of a word.
  const std::array<char32_t, 256> alphabet = ByteAlphabet();
  for (int b = 0; b < 256; ++b) {
    std::string symbol;
    AppendUtf8(alphabet[b], &symbol);
    t.byte_ids_[b] = find_id(symbol);
    t.byte_end_ids_[b] = find_id(absl::StrCat(symbol, kEndOfWord));
    if (t.byte_ids_[b] < 0 || t.byte_end_ids_[b] < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("vocab_path '%s' lacks '%s' or '%s%s' (the symbol of byte 0x%02X)",
                          options.vocab_path, symbol, symbol, kEndOfWord, b));
    }
  }

  // merges.txt: rank = line order. Merging the lowest rank first (Bpe) reproduces CLIP's
  // round-by-round loop when no merge uses a token that a later line creates; check that.
  absl::StatusOr<std::string> merges_text = ReadFile(options.merges_path, "merges_path");
  if (!merges_text.ok()) return merges_text.status();
  absl::flat_hash_set<int32_t> used_as_part;
  int32_t rank = 0;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(*merges_text, '\n')) {
    ++line_number;
    if (line_number == 1 && absl::StartsWith(line, "#version")) continue;
    const std::vector<absl::string_view> parts =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (parts.empty()) continue;
    const std::string where =
        absl::StrCat("merges_path '", options.merges_path, "' line ", line_number, " '", line, "'");
    if (parts.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": expected two tokens"));
    }
    const int32_t left = find_id(std::string(parts[0]));
    const int32_t right = find_id(std::string(parts[1]));
    const int32_t result = find_id(absl::StrCat(parts[0], parts[1]));
    if (left < 0 || right < 0 || result < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": a part or the merged token is not in vocab.json"));
    }
    if (used_as_part.contains(result)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": creates a token that an earlier merge already uses"));
    }
    if (!t.merges_.emplace(PairKey(left, right), Merge{rank++, result}).second) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": duplicate merge"));
    }
    used_as_part.insert(left);
    used_as_part.insert(right);
  }

  // Special tokens.
  const std::pair<const std::string*, int32_t*> specials[] = {{&options.bos_token, &t.bos_id_},
                                                              {&options.eos_token, &t.eos_id_},
                                                              {&options.pad_token, &t.pad_id_}};
  for (const auto& [token, id] : specials) {
    *id = find_id(*token);
    if (*id < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "special token '", *token, "' is not in vocab_path '", options.vocab_path, "'"));
    }
  }
  for (std::string_view literal : kSpecialTokens) {
    if (const int32_t id = find_id(std::string(literal)); id >= 0) {
      t.special_ids_.emplace(literal, id);
    }
  }
  t.shard_capacity_ = (options.word_cache_capacity + kCacheShards - 1) / kCacheShards;
  return tokenizer;
}

absl::StatusOr<std::vector<int32_t>> ClipTokenizer::Encode(std::string_view text) const {
  std::u32string decoded;
  if (absl::Status status = DecodeUtf8(text, &decoded); !status.ok()) return status;
  const std::u32string cleaned =
      ToLower(CollapseWhitespace(HtmlUnescape(HtmlUnescape(std::move(decoded)))));
  std::vector<int32_t> ids;
  std::string word;
  PreTokenize(cleaned, [&](size_t begin, size_t end) {
    word.clear();
    for (size_t i = begin; i < end; ++i) AppendUtf8(cleaned[i], &word);
    EncodeWord(word, &ids);
  });
  return ids;
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
