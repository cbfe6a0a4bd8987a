#include "worker/text_cleanup.h"

#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/html_entities.h"

namespace dmdserve {
namespace text_cleanup {
namespace {

using ::testing::HasSubstr;

// `text` decoded; fails the test if it is not valid UTF-8.
std::u32string Decode(std::string_view text) {
  std::u32string decoded;
  const absl::Status status = DecodeUtf8(text, &decoded);
  EXPECT_TRUE(status.ok()) << status;
  return decoded;
}

std::string Hex(char32_t cp) { return absl::StrFormat("U+%04X", static_cast<uint32_t>(cp)); }

// ---- UTF-8 ----

TEST(DecodeUtf8Test, DecodesEveryEncodingLengthAtItsBoundaries) {
  EXPECT_EQ(Decode(""), U"");
  EXPECT_EQ(Decode(std::string("a\0b", 3)), std::u32string(U"a\0b", 3));
  EXPECT_EQ(Decode("\x7F"), U"\x7F");
  EXPECT_EQ(Decode("\xC2\x80"), U"\x80");
  EXPECT_EQ(Decode("\xDF\xBF"), U"\x7FF");
  EXPECT_EQ(Decode("\xE0\xA0\x80"), U"\x800");
  EXPECT_EQ(Decode("\xED\x9F\xBF"), U"\xD7FF");                    // just below the surrogates
  EXPECT_EQ(Decode("\xEE\x80\x80"), U"\xE000");                    // just above them
  EXPECT_EQ(Decode("\xEF\xBF\xBE\xEF\xBF\xBF"), U"\xFFFE\xFFFF");  // non-characters are valid
  EXPECT_EQ(Decode("\xF0\x90\x80\x80"), U"\x10000");
  EXPECT_EQ(Decode("\xF4\x8F\xBF\xBF"), U"\x10FFFF");
  EXPECT_EQ(Decode("caf\xC3\xA9 \xE6\x9D\xB1 \xF0\x9F\x99\x82"), U"caf\xE9 \x6771 \x1F642");
}

TEST(DecodeUtf8Test, ClearsTheOutputFirst) {
  std::u32string out = U"old";
  ASSERT_TRUE(DecodeUtf8("new", &out).ok());
  EXPECT_EQ(out, U"new");
}

struct InvalidCase {
  const char* name;
  std::string text;
  size_t offset;
  const char* bytes;  // the malformed sequence as the message shows it
};

void PrintTo(const InvalidCase& c, std::ostream* os) { *os << c.name; }

class DecodeUtf8InvalidTest : public ::testing::TestWithParam<InvalidCase> {};

TEST_P(DecodeUtf8InvalidTest, IsInvalidArgumentNamingOffsetAndBytes) {
  const InvalidCase& c = GetParam();
  std::u32string out;
  const absl::Status status = DecodeUtf8(c.text, &out);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "text is not valid UTF-8 at byte offset " + std::to_string(c.offset) +
                                  ": malformed sequence " + c.bytes);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, DecodeUtf8InvalidTest,
    ::testing::Values(InvalidCase{"LoneContinuation", "ab\x80!", 2, "80"},
                      InvalidCase{"TruncatedAtEnd", "abc\xE2\x82", 3, "E2 82"},
                      InvalidCase{"TruncatedBeforeAscii", "a\xE2\x82z", 1, "E2 82"},
                      InvalidCase{"TruncatedFourByte", "\xF0\x9F\x99 cat", 0, "F0 9F 99"},
                      InvalidCase{"LeadAtEnd", "ok\xC3", 2, "C3"},
                      InvalidCase{"OverlongSlash", "x\xC0\xAF", 1, "C0 AF"},
                      InvalidCase{"OverlongC1", "\xC1\xBF", 0, "C1 BF"},
                      InvalidCase{"OverlongThreeByte", "\xE0\x80\xAF", 0, "E0 80 AF"},
                      InvalidCase{"OverlongFourByte", "\xF0\x8F\xBF\xBF", 0, "F0 8F BF BF"},
                      InvalidCase{"OverlongNul", "ok\xC0\x80", 2, "C0 80"},
                      InvalidCase{"FirstSurrogate", "ok \xED\xA0\x80", 3, "ED A0 80"},
                      InvalidCase{"LastSurrogate", "\xED\xBF\xBF", 0, "ED BF BF"},
                      InvalidCase{"AboveMaxCodePoint", "\xF4\x90\x80\x80", 0, "F4 90 80 80"},
                      InvalidCase{"LeadF5", "\xF5\x80\x80\x80", 0, "F5 80 80 80"},
                      InvalidCase{"InvalidByteFF", "cat \xFF", 4, "FF"},
                      InvalidCase{"FiveByteLead", "\xF8\x88\x80\x80\x80", 0, "F8 88 80 80"},
                      InvalidCase{"AfterValidEmoji", "\xF0\x9F\x99\x82\x80", 4, "80"}),
    [](const ::testing::TestParamInfo<InvalidCase>& info) { return info.param.name; });

TEST(AppendUtf8Test, EncodesEveryScalarValueAsItsOwnDecoding) {
  for (char32_t cp = 0; cp <= 0x10FFFF; ++cp) {
    if (cp == 0xD800) cp = 0xE000;  // surrogates are not scalar values
    std::string encoded;
    AppendUtf8(cp, &encoded);
    const size_t expected_length = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    ASSERT_EQ(encoded.size(), expected_length) << Hex(cp);
    std::u32string decoded;
    ASSERT_TRUE(DecodeUtf8(encoded, &decoded).ok()) << Hex(cp);
    ASSERT_EQ(decoded, std::u32string(1, cp)) << Hex(cp);
  }
}

TEST(AppendUtf8Test, EncodesNonCharactersAsUtf8AndAppends) {
  std::string out = "x";
  AppendUtf8(0xFFFE, &out);
  AppendUtf8(0xFFFF, &out);
  AppendUtf8(0xE9, &out);
  AppendUtf8(0x1F642, &out);
  EXPECT_EQ(out, "x\xEF\xBF\xBE\xEF\xBF\xBF\xC3\xA9\xF0\x9F\x99\x82");
}

// ---- Character classes ----

TEST(CharacterClassTest, LettersAndNumbers) {
  for (char32_t cp : {U'a', U'Z', U'\xE9', U'\x3A3', U'\x6771', U'\x2B0', U'\xAA', U'\x1C5'}) {
    EXPECT_TRUE(IsLetter(cp)) << Hex(cp);
    EXPECT_FALSE(IsNumber(cp)) << Hex(cp);
  }
  // Nd, Nl, No: digits, Roman numerals, fractions, superscripts, Arabic-Indic digits.
  for (char32_t cp : {U'0', U'9', U'\x2167', U'\xBD', U'\xB2', U'\x663'}) {
    EXPECT_TRUE(IsNumber(cp)) << Hex(cp);
    EXPECT_FALSE(IsLetter(cp)) << Hex(cp);
  }
  for (char32_t cp : {U' ', U'!', U'\'', U'_', U'\x301', U'\x345', U'\x1F642', U'\xFFFD'}) {
    EXPECT_FALSE(IsLetter(cp)) << Hex(cp);
    EXPECT_FALSE(IsNumber(cp)) << Hex(cp);
  }
}

TEST(CharacterClassTest, WhiteSpaceAndPythonSpaceOnEveryCodePoint) {
  // Unicode White_Space, as listed by the Unicode Character Database (PropList.txt).
  const std::u32string white_space =
      U"\t\n\x0B\x0C\r \x85\xA0\x1680\x2000\x2001\x2002\x2003\x2004\x2005\x2006\x2007\x2008"
      U"\x2009\x200A\x2028\x2029\x202F\x205F\x3000";
  for (char32_t cp = 0; cp <= 0x10FFFF; ++cp) {
    const bool is_white_space = white_space.find(cp) != std::u32string::npos;
    ASSERT_EQ(IsRegexSpace(cp), is_white_space) << Hex(cp);
    ASSERT_EQ(IsPythonSpace(cp), is_white_space || (cp >= 0x1C && cp <= 0x1F)) << Hex(cp);
  }
  // Look like spaces, but are not White_Space.
  for (char32_t cp : {U'\x200B', U'\x180E', U'\xFEFF', U'\x0'}) EXPECT_FALSE(IsPythonSpace(cp));
}

TEST(CharacterClassTest, CaseIgnorableAndCased) {
  // Mn, Me, Cf, Lm, Sk, and Word_Break MidLetter / MidNumLet / Single_Quote.
  for (char32_t cp : {U'\x301', U'\x20DD', U'\xAD', U'\x2B0', U'^', U'\'', U'.', U':', U'\xB7',
                      U'\x2019', U'\xFF0E'}) {
    EXPECT_TRUE(IsCaseIgnorable(cp)) << Hex(cp);
    EXPECT_FALSE(IsCased(cp)) << Hex(cp);
  }
  // Lu, Ll, Lt, and Other_Lowercase / Other_Uppercase outside the letter categories.
  for (char32_t cp : {U'A', U'a', U'\x1C5', U'\x3A3', U'\xAA', U'\xBA', U'\x2167', U'\x24D0',
                      U'\x1F130', U'\x1F189'}) {
    EXPECT_TRUE(IsCased(cp)) << Hex(cp);
    EXPECT_FALSE(IsCaseIgnorable(cp)) << Hex(cp);
  }
  for (char32_t cp : {U'1', U' ', U'!', U'\x6771', U'\x1F642'}) {
    EXPECT_FALSE(IsCased(cp)) << Hex(cp);
    EXPECT_FALSE(IsCaseIgnorable(cp)) << Hex(cp);
  }
}

// ---- HTML unescape (expected values are Python's html.unescape) ----

struct UnescapeCase {
  const char* name;
  std::u32string text;
  std::u32string once;  // html.unescape(text)
};

void PrintTo(const UnescapeCase& c, std::ostream* os) { *os << c.name; }

class HtmlUnescapeTest : public ::testing::TestWithParam<UnescapeCase> {};

TEST_P(HtmlUnescapeTest, MatchesPython) {
  EXPECT_EQ(HtmlUnescape(GetParam().text), GetParam().once);
}

INSTANTIATE_TEST_SUITE_P(
    Numeric, HtmlUnescapeTest,
    ::testing::Values(UnescapeCase{"Decimal", U"&#39;&#66", U"'B"},
                      UnescapeCase{"Hex", U"&#x1F600;&#X43", U"\U0001F600C"},
                      UnescapeCase{"Nul", U"&#0;", U"\xFFFD"},
                      UnescapeCase{"Windows1252", U"&#128;&#x9f;", U"\x20AC\x178"},
                      UnescapeCase{"Surrogate", U"&#xD800;", U"\xFFFD"},
                      UnescapeCase{"AboveMax", U"&#1114112;", U"\xFFFD"},
                      UnescapeCase{"Huge", U"&#99999999999999999999;", U"\xFFFD"},
                      UnescapeCase{"ControlsDropped", U"a&#1;&#11;&#x7f;b", U"ab"},
                      UnescapeCase{"NonCharactersDropped", U"a&#65534;&#xFDD0;b", U"ab"},
                      UnescapeCase{"CarriageReturnKept", U"a&#13;b", U"a\rb"},
                      UnescapeCase{"NoDigits", U"&#;&#x;&#xg&#", U"&#;&#x;&#xg&#"}),
    [](const ::testing::TestParamInfo<UnescapeCase>& info) { return info.param.name; });

INSTANTIATE_TEST_SUITE_P(
    Named, HtmlUnescapeTest,
    ::testing::Values(UnescapeCase{"Basic", U"Tom &amp; Jerry &lt;3&gt;", U"Tom & Jerry <3>"},
                      UnescapeCase{"LegacyWithoutSemicolon", U"&copy 2024 &amp", U"\xA9 2024 &"},
                      UnescapeCase{"NotLegacy", U"&notin;", U"\x2209"},
                      UnescapeCase{"LongestLegacyPrefix", U"&notit; &ampfoo", U"\u00ACit; &foo"},
                      UnescapeCase{"PrefixBeforeNonAscii", U"&amp\xE9", U"&\xE9"},
                      UnescapeCase{"TwoCodePoints", U"&NotNestedGreaterGreater;&nGt;",
                                   U"\x2AA2\x338\x226B\x20D2"},
                      UnescapeCase{"CaseSensitive", U"&AMP;&Amp;&Sigma;", U"&&Amp;\x3A3"},
                      UnescapeCase{"Unknown", U"&unknown;", U"&unknown;"},
                      UnescapeCase{"LongNameNotMatched", U"&abcdefghijklmnopqrstuvwxyzabcdefgh;",
                                   U"&abcdefghijklmnopqrstuvwxyzabcdefgh;"},
                      UnescapeCase{"PrefixOfLongRun", U"&lt" + std::u32string(40, U'x'),
                                   U"<" + std::u32string(40, U'x')},
                      UnescapeCase{"Ampersands", U"& &; AT&T &&amp;", U"& &; AT&T &&"},
                      UnescapeCase{"Empty", U"", U""}),
    [](const ::testing::TestParamInfo<UnescapeCase>& info) { return info.param.name; });

TEST(HtmlUnescapeTest, OnePassLeavesWhatItProducedAndCleanUpUnescapesTwice) {
  EXPECT_EQ(HtmlUnescape(U"&amp;amp; &amp;lt; &#38;amp; &#x26;#x41;"), U"&amp; &lt; &amp; &#x41;");
  EXPECT_EQ(CleanUp(U"&amp;amp; &amp;lt; &#38;amp; &#x26;#x41;"), U"& < & a");
  // Not three times.
  EXPECT_EQ(CleanUp(U"&amp;amp;amp;"), U"&amp;");
}

TEST(HtmlEntitiesTest, FindsExactNamesOnly) {
  const HtmlEntity* amp = FindHtmlEntity("amp;");
  ASSERT_NE(amp, nullptr);
  EXPECT_EQ(amp->first, U'&');
  EXPECT_EQ(amp->second, 0u);
  ASSERT_NE(FindHtmlEntity("amp"), nullptr);
  EXPECT_EQ(FindHtmlEntity("notin"), nullptr);  // only "notin;"
  EXPECT_EQ(FindHtmlEntity("am"), nullptr);
  EXPECT_EQ(FindHtmlEntity(""), nullptr);
  // The first and the last names of the table.
  ASSERT_NE(FindHtmlEntity("AElig"), nullptr);
  const HtmlEntity* zwnj = FindHtmlEntity("zwnj;");
  ASSERT_NE(zwnj, nullptr);
  EXPECT_EQ(zwnj->first, U'\x200C');
  const HtmlEntity* ngt = FindHtmlEntity("nGt;");
  ASSERT_NE(ngt, nullptr);
  EXPECT_EQ(ngt->first, U'\x226B');
  EXPECT_EQ(ngt->second, U'\x20D2');
}

// ---- Whitespace ----

TEST(CollapseWhitespaceTest, CollapsesRunsAndStrips) {
  EXPECT_EQ(CollapseWhitespace(U"  a \t\n b  "), U"a b");
  EXPECT_EQ(CollapseWhitespace(U"a\u3000\u2028\u00A0\u0085b\r\nc"), U"a b c");
  EXPECT_EQ(CollapseWhitespace(U"a\u2003\u2003\u200Bb"), U"a \u200Bb");  // ZWSP is no space
  EXPECT_EQ(CollapseWhitespace(U""), U"");
  EXPECT_EQ(CollapseWhitespace(U" \t\x3000 "), U"");
}

TEST(CollapseWhitespaceTest, StripsPythonOnlySpacesAtTheEndsButKeepsThemInside) {
  // U+001C..U+001F are str.isspace() but not White_Space: stripped, never collapsed.
  EXPECT_EQ(CollapseWhitespace(U"\u001Ca\u001D\u001Eb\u001F"), U"a\u001D\u001Eb");
  EXPECT_EQ(CollapseWhitespace(U" \x1C a \x1F "), U"a");
}

// ---- Lower case (expected values are Python's str.lower) ----

TEST(ToLowerTest, AsciiAndSimpleMappings) {
  EXPECT_EQ(ToLower(U"A Photo OF a CAT, 42!"), U"a photo of a cat, 42!");
  EXPECT_EQ(ToLower(U"\xC0\xC9\xCE\xD5\xDC"), U"\xE0\xE9\xEE\xF5\xFC");
  EXPECT_EQ(ToLower(U"\x414\x41E\x41C"), U"\x434\x43E\x43C");         // Cyrillic ДОМ
  EXPECT_EQ(ToLower(U"Stra\u00DFe \u1E9E"), U"stra\u00DFe \u00DF");   // capital sharp s
  EXPECT_EQ(ToLower(U"\x212A\x212B\x1C4\x1C5"), U"k\xE5\x1C6\x1C6");  // Kelvin, Angstrom, DŽ
  EXPECT_EQ(ToLower(U"\x2167\x24B6\x6771\x1F642"), U"\x2177\x24D0\x6771\x1F642");
  EXPECT_EQ(ToLower(U""), U"");
}

TEST(ToLowerTest, DottedCapitalIUsesTheFullMapping) {
  EXPECT_EQ(ToLower(U"\x130stanbul"), U"i\x307stanbul");
}

TEST(ToLowerTest, FinalSigma) {
  EXPECT_EQ(ToLower(U"\x39F\x394\x39F\x3A3"), U"\x3BF\x3B4\x3BF\x3C2");  // ΟΔΟΣ -> οδος
  EXPECT_EQ(ToLower(U"\x3A3"), U"\x3C3");                                // alone
  EXPECT_EQ(ToLower(U"\x3A3\x391"), U"\x3C3\x3B1");                      // initial
  EXPECT_EQ(ToLower(U"\x391\x3A3\x391"), U"\x3B1\x3C3\x3B1");            // medial
  EXPECT_EQ(ToLower(U"\x391\x3A3\x3A3"), U"\x3B1\x3C3\x3C2");
  EXPECT_EQ(ToLower(U"\x391\x3A3 \x391\x3A3"), U"\x3B1\x3C2 \x3B1\x3C2");
  // Case-ignorable characters are skipped on both sides.
  EXPECT_EQ(ToLower(U"\x391\x301\x3A3"), U"\x3B1\x301\x3C2");
  EXPECT_EQ(ToLower(U"\x391\x3A3\x301"), U"\x3B1\x3C2\x301");
  EXPECT_EQ(ToLower(U"\x391\x3A3\xAD\x392"), U"\x3B1\x3C3\xAD\x3B2");
  EXPECT_EQ(ToLower(U"\x391\x3A3.\x392"), U"\x3B1\x3C3.\x3B2");
  EXPECT_EQ(ToLower(U"\x391\x3A3'"), U"\x3B1\x3C2'");
  EXPECT_EQ(ToLower(U"'\x3A3"), U"'\x3C3");          // nothing cased before
  EXPECT_EQ(ToLower(U"\x2B0\x3A3"), U"\x2B0\x3C3");  // a modifier letter is not cased
  // Cased characters that are not letters.
  EXPECT_EQ(ToLower(U"\x2167\x3A3"), U"\x2177\x3C2");
  EXPECT_EQ(ToLower(U"\x1F130\x3A3"), U"\x1F130\x3C2");
  EXPECT_EQ(ToLower(U"\xAA\x3A3"), U"\xAA\x3C2");
}

// ---- The whole clean-up ----

TEST(CleanUpTest, UnescapesCollapsesStripsAndLowerCases) {
  EXPECT_EQ(CleanUp(Decode("  Tom &amp;amp; JERRY&nbsp;&nbsp;\xE2\x80\x83 \xCE\x9F\xCE\xA3 ")),
            U"tom & jerry \x3BF\x3C2");
  // An entity that yields whitespace is collapsed; one that yields a capital is lower-cased.
  EXPECT_EQ(CleanUp(U"&Sigma;&#x41;&Tab;&NewLine;b"), U"\u03C3a b");
  EXPECT_EQ(CleanUp(U""), U"");
}

}  // namespace
}  // namespace text_cleanup
}  // namespace dmdserve
