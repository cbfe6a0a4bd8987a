#include "worker/text_cleanup.h"

#include <utf8proc.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "worker/html_entities.h"

namespace dmdserve {
namespace text_cleanup {
namespace {

// ---- UTF-8 ----

// The error for the malformed sequence at text[offset]: its lead byte and the continuation
// bytes after it (at most four bytes), in hex.
absl::Status InvalidUtf8(std::string_view text, size_t offset) {
  const auto byte_at = [&text](size_t i) { return static_cast<unsigned char>(text[i]); };
  std::string bytes = absl::StrFormat("%02X", byte_at(offset));
  if ((byte_at(offset) & 0xC0) == 0xC0) {
    for (size_t i = offset + 1; i < text.size() && i < offset + 4 && (byte_at(i) & 0xC0) == 0x80;
         ++i) {
      absl::StrAppendFormat(&bytes, " %02X", byte_at(i));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("text is not valid UTF-8 at byte offset ", offset,
                                                 ": malformed sequence ", bytes));
}

// ---- Character classes ----

utf8proc_category_t Category(char32_t cp) {
  return utf8proc_category(static_cast<utf8proc_int32_t>(cp));
}

// ---- HTML unescape ----

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

// The numeric reference whose text starts at s[p] == '#' (just after the '&'), matched like
// `#[0-9]+;?|#[xX][0-9a-fA-F]+;?`: appends its replacement to `out` and returns how many
// characters after the '&' it takes, or 0 (nothing appended) if there are no digits.
size_t ReplaceNumericReference(const std::u32string& s, size_t p, std::u32string* out) {
  const size_t n = s.size();
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

void AppendEntity(const HtmlEntity& entity, std::u32string* out) {
  out->push_back(entity.first);
  if (entity.second != 0) out->push_back(entity.second);
}

// The named reference whose text starts at s[p] (just after the '&'), matched like
// `[^\t\n\f <&#;]{1,32};?`: the whole match if it names a reference, else its longest prefix
// (of at least 2 characters) that does, followed by the rest of the match unchanged. Appends the
// replacement to `out` and returns how many characters after the '&' it takes, or 0 (nothing
// appended) if no reference matches.
size_t ReplaceNamedReference(const std::u32string& s, size_t p, std::u32string* out) {
  const size_t n = s.size();
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
      AppendEntity(*entity, out);
      return length;
    }
  }
  for (size_t x = std::min(ascii.size(), length - 1); x >= 2; --x) {
    if (const HtmlEntity* entity = FindHtmlEntity(std::string_view(ascii).substr(0, x))) {
      AppendEntity(*entity, out);
      out->append(s, p + x, length - x);
      return length;
    }
  }
  return 0;
}

}  // namespace

// ---- UTF-8 ----

absl::Status DecodeUtf8(std::string_view text, std::u32string* out) {
  out->clear();
  out->reserve(text.size());
  const auto* bytes = reinterpret_cast<const utf8proc_uint8_t*>(text.data());
  for (size_t i = 0; i < text.size();) {
    if (bytes[i] < 0x80) {  // ASCII, without a library call
      out->push_back(bytes[i++]);
      continue;
    }
    // utf8proc_iterate accepts exactly the well-formed sequences of the Unicode standard.
    utf8proc_int32_t cp;
    const utf8proc_ssize_t length =
        utf8proc_iterate(bytes + i, static_cast<utf8proc_ssize_t>(text.size() - i), &cp);
    if (length <= 0) return InvalidUtf8(text, i);
    out->push_back(static_cast<char32_t>(cp));
    i += static_cast<size_t>(length);
  }
  return absl::OkStatus();
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {  // ASCII, without a library call
    out->push_back(static_cast<char>(cp));
    return;
  }
  utf8proc_uint8_t buffer[4];
  const utf8proc_ssize_t length = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buffer);
  out->append(reinterpret_cast<const char*>(buffer), static_cast<size_t>(length));
}

// ---- Character classes ----

bool IsPythonSpace(char32_t cp) { return IsRegexSpace(cp) || (cp >= 0x1C && cp <= 0x1F); }

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

bool IsCased(char32_t cp) {
  const utf8proc_category_t c = Category(cp);
  if (c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT) {
    return true;
  }
  return cp == 0xAA || cp == 0xBA || (cp >= 0x2160 && cp <= 0x217F) ||
         (cp >= 0x24B6 && cp <= 0x24E9) || (cp >= 0x1F130 && cp <= 0x1F149) ||
         (cp >= 0x1F150 && cp <= 0x1F169) || (cp >= 0x1F170 && cp <= 0x1F189);
}

// ---- Clean-up steps ----

std::u32string HtmlUnescape(std::u32string s) {
  if (s.find(U'&') == std::u32string::npos) return s;
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    if (s[i] == '&' && i + 1 < s.size()) {
      const size_t consumed = s[i + 1] == '#' ? ReplaceNumericReference(s, i + 1, &out)
                                              : ReplaceNamedReference(s, i + 1, &out);
      if (consumed > 0) {
        i += 1 + consumed;
        continue;
      }
    }
    out.push_back(s[i++]);
  }
  return out;
}

// (CLIP strips before collapsing too; that first strip cannot change the result.)
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

std::u32string CleanUp(std::u32string s) {
  return ToLower(CollapseWhitespace(HtmlUnescape(HtmlUnescape(std::move(s)))));
}

}  // namespace text_cleanup
}  // namespace dmdserve
