// Text clean-up of the CLIP tokenizer (worker/clip_tokenizer.h), reproducing the Python that
// CLIP's simple_tokenizer.py runs before it splits a prompt into words:
//   html.unescape(html.unescape(text)).strip(), runs of regex `\s` -> ' ', .strip(), .lower()
// together with the strict UTF-8 decoding before it, the UTF-8 encoding after it, and the Unicode
// character classes that both this clean-up and CLIP's pre-tokenizer regex use. Unicode data
// (general categories, simple lower-case mapping) comes from utf8proc 2.8 (Unicode 15.0);
// docs/TOKENIZER.md says where and how exactly Python's rules are matched.
//
// Example:
//   std::u32string text;
//   if (absl::Status s = text_cleanup::DecodeUtf8("Tom &amp;amp; JERRY ", &text); !s.ok()) ...
//   text = text_cleanup::CleanUp(std::move(text));  // U"tom & jerry"
//
// Every function is pure (no state) and may be called from any number of threads at once. Code
// points are char32_t; the functions that take code points expect Unicode scalar values
// (<= U+10FFFF, no surrogates), which is what DecodeUtf8 produces.
#ifndef DMDSERVE_WORKER_TEXT_CLEANUP_H_
#define DMDSERVE_WORKER_TEXT_CLEANUP_H_

#include <utf8proc.h>

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace dmdserve {
namespace text_cleanup {

// ---- UTF-8 ----

// Decodes `text` into `out` (cleared first). INVALID_ARGUMENT if `text` is not valid UTF-8
// (stray continuation bytes, truncated sequences, overlong forms, surrogates, code points above
// U+10FFFF): "text is not valid UTF-8 at byte offset N: malformed sequence XX ..", where N is the
// offset of the first bad sequence and XX .. its bytes in hex.
absl::Status DecodeUtf8(std::string_view text, std::u32string* out);

// Appends the UTF-8 encoding of the scalar value `cp` to `out`.
void AppendUtf8(char32_t cp, std::string* out);

// ---- Character classes ----

// The first three are defined inline below: the pre-tokenizer calls them for every character.

// \p{L}: general category Lu, Ll, Lt, Lm or Lo.
inline bool IsLetter(char32_t cp);
// \p{N}: general category Nd, Nl or No.
inline bool IsNumber(char32_t cp);
// `\s` of the `regex` module CLIP uses: the Unicode White_Space property.
inline bool IsRegexSpace(char32_t cp);
// Python's str.isspace(), used by str.strip(): White_Space plus U+001C..U+001F.
bool IsPythonSpace(char32_t cp);
// Unicode Case_Ignorable (Mn, Me, Cf, Lm, Sk and the Word_Break MidLetter, MidNumLet and
// Single_Quote characters), for the final-sigma rule of ToLower.
bool IsCaseIgnorable(char32_t cp);
// Unicode Cased (Lu, Ll, Lt, Other_Lowercase, Other_Uppercase), for the final-sigma rule of
// ToLower. Other_* characters that are also Case_Ignorable (modifier letters, U+0345) are left
// out: the final-sigma rule never asks about them.
bool IsCased(char32_t cp);

// ---- Clean-up steps ----

// One pass of Python's html.unescape(): numeric references (decimal or hex, ';' optional) with
// the Windows-1252 remapping of 0x80..0x9F, U+FFFD for NUL, surrogates and values above
// U+10FFFF, and nothing for other control characters and non-characters; every HTML5 named
// reference, legacy ones also without ';', else the longest legacy name that prefixes the text.
// Anything else, including a lone '&', is kept as it is.
std::u32string HtmlUnescape(std::u32string s);

// Every run of White_Space (IsRegexSpace) becomes one ' ', then Python whitespace
// (IsPythonSpace) is stripped from both ends.
std::u32string CollapseWhitespace(const std::u32string& s);

// Python's str.lower(): utf8proc's simple lower-case mapping, plus the full mapping of U+0130
// (i + U+0307) and the final-sigma rule: U+03A3 becomes U+03C2 after a cased letter when no
// cased letter follows (Case_Ignorable characters are skipped in both directions), else U+03C3.
std::u32string ToLower(const std::u32string& s);

// CLIP's whole clean-up: ToLower(CollapseWhitespace(HtmlUnescape(HtmlUnescape(s)))).
std::u32string CleanUp(std::u32string s);

// ---- Inline definitions ----

inline bool IsLetter(char32_t cp) {
  const utf8proc_category_t c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO;
}

inline bool IsNumber(char32_t cp) {
  const utf8proc_category_t c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO;
}

inline bool IsRegexSpace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

}  // namespace text_cleanup
}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_TEXT_CLEANUP_H_
