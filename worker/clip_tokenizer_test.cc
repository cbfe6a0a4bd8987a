#include "worker/clip_tokenizer.h"

#include <cstdint>
#include <fstream>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace dmdserve {
namespace {

using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

const char kVocabDir[] = DMDSERVE_SOURCE_DIR "/models/tokenizers/openai-clip";
// Produced by OpenAI CLIP's reference tokenizer (see tools/tests/testdata/README.md).
const char kReferenceVectors[] =
    DMDSERVE_SOURCE_DIR "/worker/testdata/clip_tokenizer_reference_vectors.jsonl";
// Produced by tools/clip_tokenizer_reference.py (an independent Python implementation that
// first reproduces kReferenceVectors).
const char kExtraVectors[] =
    DMDSERVE_SOURCE_DIR "/worker/testdata/clip_tokenizer_extra_vectors.jsonl";

struct Vector {
  std::string name;
  std::string text;
  std::vector<int32_t> ids;
  std::vector<int32_t> input_ids_77;
};

std::vector<Vector> ReadVectors(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.is_open()) << path;
  std::vector<Vector> vectors;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const nlohmann::json record = nlohmann::json::parse(line);
    vectors.push_back({record.value("name", record["text"].get<std::string>()),
                       record["text"].get<std::string>(), record["ids"].get<std::vector<int32_t>>(),
                       record["input_ids_77"].get<std::vector<int32_t>>()});
  }
  return vectors;
}

ClipTokenizer::Options DefaultOptions() {
  ClipTokenizer::Options options;
  options.vocab_path = std::string(kVocabDir) + "/vocab.json";
  options.merges_path = std::string(kVocabDir) + "/merges.txt";
  return options;
}

std::unique_ptr<ClipTokenizer> MakeTokenizer(const ClipTokenizer::Options& options) {
  absl::StatusOr<std::unique_ptr<ClipTokenizer>> tokenizer = ClipTokenizer::Create(options);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? *std::move(tokenizer) : nullptr;
}

// The id vocab.json gives `token`, read here without the tokenizer.
int32_t VocabId(const std::string& token) {
  std::ifstream in(std::string(kVocabDir) + "/vocab.json");
  return nlohmann::json::parse(in).at(token).get<int32_t>();
}

void ExpectMatchesVectors(const ClipTokenizer& tokenizer, const std::vector<Vector>& vectors) {
  for (const Vector& v : vectors) {
    SCOPED_TRACE(v.name);
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(v.text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_THAT(*ids, ElementsAreArray(v.ids));
    absl::StatusOr<ClipTokenizer::ModelInput> input = tokenizer.EncodeForModel(v.text);
    ASSERT_TRUE(input.ok()) << input.status();
    EXPECT_THAT(input->input_ids, ElementsAreArray(v.input_ids_77));
    EXPECT_THAT(input->ids, ElementsAreArray(v.ids));
    EXPECT_EQ(input->truncated_tokens, std::max<int>(0, static_cast<int>(v.ids.size()) - 75));
  }
}

TEST(ClipTokenizerTest, ReproducesReferenceTestVectors) {
  const std::vector<Vector> vectors = ReadVectors(kReferenceVectors);
  ASSERT_GE(vectors.size(), 10u);
  auto tokenizer = MakeTokenizer(DefaultOptions());
  ASSERT_NE(tokenizer, nullptr);
  ExpectMatchesVectors(*tokenizer, vectors);
}

TEST(ClipTokenizerTest, ReproducesExtraVectors) {
  const std::vector<Vector> vectors = ReadVectors(kExtraVectors);
  ASSERT_GE(vectors.size(), 30u);
  auto tokenizer = MakeTokenizer(DefaultOptions());
  ASSERT_NE(tokenizer, nullptr);
  ExpectMatchesVectors(*tokenizer, vectors);
  // A second pass is served from the word cache.
  ExpectMatchesVectors(*tokenizer, vectors);
}

TEST(ClipTokenizerTest, ExtraVectorsCoverTruncation) {
  int truncated_prompts = 0;
  for (const Vector& v : ReadVectors(kExtraVectors)) truncated_prompts += v.ids.size() > 75;
  EXPECT_GE(truncated_prompts, 1);
}

TEST(ClipTokenizerTest, SameIdsWithoutCacheAndWithATinyCache) {
  std::vector<Vector> vectors = ReadVectors(kReferenceVectors);
  const std::vector<Vector> extra = ReadVectors(kExtraVectors);
  vectors.insert(vectors.end(), extra.begin(), extra.end());
  for (size_t capacity : {0, 1, 7}) {
    SCOPED_TRACE(capacity);
    ClipTokenizer::Options options = DefaultOptions();
    options.word_cache_capacity = capacity;
    auto tokenizer = MakeTokenizer(options);
    ASSERT_NE(tokenizer, nullptr);
    ExpectMatchesVectors(*tokenizer, vectors);
  }
}

TEST(ClipTokenizerTest, ConcurrentEncodeGivesIdenticalResults) {
  std::vector<Vector> vectors = ReadVectors(kReferenceVectors);
  const std::vector<Vector> extra = ReadVectors(kExtraVectors);
  vectors.insert(vectors.end(), extra.begin(), extra.end());
  for (size_t capacity : {size_t{1} << 16, size_t{32}}) {  // the small one evicts constantly
    ClipTokenizer::Options options = DefaultOptions();
    options.word_cache_capacity = capacity;
    auto tokenizer = MakeTokenizer(options);
    ASSERT_NE(tokenizer, nullptr);
    constexpr int kThreads = 8;
    std::vector<int> mismatches(kThreads, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        for (int round = 0; round < 20; ++round) {
          for (size_t i = 0; i < vectors.size(); ++i) {
            const Vector& v = vectors[(i + t * 7) % vectors.size()];
            absl::StatusOr<ClipTokenizer::ModelInput> input = tokenizer->EncodeForModel(v.text);
            if (!input.ok() || input->ids != v.ids || input->input_ids != v.input_ids_77) {
              ++mismatches[t];
            }
          }
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    EXPECT_THAT(mismatches, ::testing::Each(0)) << "capacity " << capacity;
  }
}

struct InvalidUtf8Case {
  const char* name;
  std::string text;
  size_t offset;
};

void PrintTo(const InvalidUtf8Case& c, std::ostream* os) { *os << c.name; }

class ClipTokenizerInvalidUtf8Test : public ::testing::TestWithParam<InvalidUtf8Case> {};

TEST_P(ClipTokenizerInvalidUtf8Test, IsInvalidArgumentNamingTheOffset) {
  static const std::unique_ptr<ClipTokenizer> tokenizer = MakeTokenizer(DefaultOptions());
  ASSERT_NE(tokenizer, nullptr);
  const InvalidUtf8Case& c = GetParam();
  const std::string expected = "byte offset " + std::to_string(c.offset) + ":";
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer->Encode(c.text);
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ids.status().message(), HasSubstr(expected));
  absl::StatusOr<ClipTokenizer::ModelInput> input = tokenizer->EncodeForModel(c.text);
  EXPECT_EQ(input.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(input.status().message(), HasSubstr(expected));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ClipTokenizerInvalidUtf8Test,
    ::testing::Values(InvalidUtf8Case{"LoneContinuation",
                                      "ab\x80"
                                      "cd",
                                      2},
                      InvalidUtf8Case{"TruncatedAtEnd", "abc\xE2\x82", 3},
                      InvalidUtf8Case{"TruncatedBeforeAscii", "a\xE2\x82z", 1},
                      InvalidUtf8Case{"TruncatedFourByte", "\xF0\x9F\x99 cat", 0},
                      InvalidUtf8Case{"OverlongSlash", "x\xC0\xAF", 1},
                      InvalidUtf8Case{"OverlongThreeByte", "\xE0\x80\xAF", 0},
                      InvalidUtf8Case{"OverlongNul", "ok\xC0\x80", 2},
                      InvalidUtf8Case{"Surrogate", "ok \xED\xA0\x80", 3},
                      InvalidUtf8Case{"AboveMaxCodePoint", "\xF4\x90\x80\x80", 0},
                      InvalidUtf8Case{"InvalidByteFF", "cat \xFF", 4},
                      InvalidUtf8Case{"FiveByteLead", "\xF8\x88\x80\x80\x80", 0},
                      InvalidUtf8Case{"AfterValidEmoji", "\xF0\x9F\x99\x82\x80", 4}),
    [](const ::testing::TestParamInfo<InvalidUtf8Case>& info) { return info.param.name; });

TEST(ClipTokenizerTest, EncodeForModelLaysOutAndTruncates) {
  auto tokenizer = MakeTokenizer(DefaultOptions());
  ASSERT_NE(tokenizer, nullptr);
  const int32_t bos = VocabId("<|startoftext|>");
  const int32_t eos = VocabId("<|endoftext|>");
  // ids of "a photo of a cat" from the reference vectors: 320, 1125, 539, 320, 2368.
  absl::StatusOr<ClipTokenizer::ModelInput> input =
      tokenizer->EncodeForModel("a photo of a cat", 5);
  ASSERT_TRUE(input.ok()) << input.status();
  EXPECT_THAT(input->input_ids, ElementsAreArray({bos, 320, 1125, 539, eos}));
  EXPECT_THAT(input->ids, ElementsAreArray({320, 1125, 539, 320, 2368}));
  EXPECT_EQ(input->truncated_tokens, 2);

  input = tokenizer->EncodeForModel("a photo of a cat", 2);
  ASSERT_TRUE(input.ok()) << input.status();
  EXPECT_THAT(input->input_ids, ElementsAreArray({bos, eos}));
  EXPECT_EQ(input->truncated_tokens, 5);

  input = tokenizer->EncodeForModel("a photo of a cat", 9);
  ASSERT_TRUE(input.ok()) << input.status();
  EXPECT_THAT(input->input_ids, ElementsAreArray({bos, 320, 1125, 539, 320, 2368, eos, eos, eos}));
  EXPECT_EQ(input->truncated_tokens, 0);
}

// Concatenates id lists.
std::vector<int32_t> Concat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const std::vector<int32_t>& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

TEST(ClipTokenizerTest, APadTokenOtherThanEosStandsForItselfInText) {
  // SDXL's second tokenizer pads with "!" (id 0); Hugging Face's CLIPTokenizer splits the text on
  // it, so "!!" is two pad ids rather than BPE's "!!</w>" (748).
  auto clip = MakeTokenizer(DefaultOptions());
  ClipTokenizer::Options options = DefaultOptions();
  options.pad_token = "!";
  auto bang = MakeTokenizer(options);
  ASSERT_NE(clip, nullptr);
  ASSERT_NE(bang, nullptr);
  auto encode = [](const ClipTokenizer& t, std::string_view text) {
    absl::StatusOr<std::vector<int32_t>> ids = t.Encode(text);
    EXPECT_TRUE(ids.ok()) << ids.status();
    return ids.ok() ? *ids : std::vector<int32_t>{};
  };
  const int32_t pad = VocabId("!");
  ASSERT_EQ(pad, 0);
  ASSERT_EQ(bang->pad_id(), pad);
  const std::vector<int32_t> boot = encode(*clip, "A Photo of an Ankle-Boot");
  EXPECT_EQ(encode(*clip, "A Photo of an Ankle-Boot!!"), Concat({boot, {748}}));
  EXPECT_EQ(encode(*bang, "A Photo of an Ankle-Boot!!"), Concat({boot, {pad, pad}}));
  EXPECT_EQ(encode(*bang, "wow!!! a cat! hello!?"),
            Concat({encode(*clip, "wow"), {pad, pad, pad}, encode(*clip, "a cat"), {pad},
                    encode(*clip, "hello"), {pad}, encode(*clip, "?")}));
  // Text without the pad token is encoded exactly as before.
  EXPECT_EQ(encode(*bang, "a photo of a cat?"), encode(*clip, "a photo of a cat?"));
  // Padding and truncation count the split ids like any other.
  absl::StatusOr<ClipTokenizer::ModelInput> input = bang->EncodeForModel("cat!!", 6);
  ASSERT_TRUE(input.ok()) << input.status();
  EXPECT_THAT(input->input_ids, ElementsAreArray({clip->bos_id(), 2368, pad, pad, clip->eos_id(),
                                                  pad}));
  input = bang->EncodeForModel("!!!!!", 4);
  ASSERT_TRUE(input.ok()) << input.status();
  EXPECT_EQ(input->truncated_tokens, 3);
}

TEST(ClipTokenizerTest, RejectsMaxLengthBelowTwo) {
  auto tokenizer = MakeTokenizer(DefaultOptions());
  ASSERT_NE(tokenizer, nullptr);
  for (int max_length : {1, 0, -3}) {
    absl::StatusOr<ClipTokenizer::ModelInput> input = tokenizer->EncodeForModel("cat", max_length);
    EXPECT_EQ(input.status().code(), absl::StatusCode::kInvalidArgument) << max_length;
    EXPECT_THAT(input.status().message(), HasSubstr("max_length"));
  }
}

TEST(ClipTokenizerTest, SpecialIdsAndTokenStringsComeFromTheVocab) {
  ClipTokenizer::Options options = DefaultOptions();
  options.pad_token = "!";
  auto tokenizer = MakeTokenizer(options);
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->bos_id(), VocabId("<|startoftext|>"));
  EXPECT_EQ(tokenizer->eos_id(), VocabId("<|endoftext|>"));
  EXPECT_EQ(tokenizer->pad_id(), VocabId("!"));
  EXPECT_EQ(tokenizer->vocab_size(), 49408u);
  absl::StatusOr<ClipTokenizer::ModelInput> input = tokenizer->EncodeForModel("cat", 5);
  ASSERT_TRUE(input.ok()) << input.status();
  EXPECT_THAT(input->input_ids,
              ElementsAreArray({VocabId("<|startoftext|>"), VocabId("cat</w>"),
                                VocabId("<|endoftext|>"), VocabId("!"), VocabId("!")}));

  EXPECT_EQ(tokenizer->TokenString(VocabId("cat</w>")), "cat</w>");
  EXPECT_EQ(tokenizer->TokenString(tokenizer->bos_id()), "<|startoftext|>");
  EXPECT_EQ(tokenizer->TokenString(-1), "");
  EXPECT_EQ(tokenizer->TokenString(static_cast<int32_t>(tokenizer->vocab_size())), "");
}

TEST(ClipTokenizerTest, IdsAreWithinTheVocabAndSpellTheirTokens) {
  auto tokenizer = MakeTokenizer(DefaultOptions());
  ASSERT_NE(tokenizer, nullptr);
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer->Encode("Ünïcödé ✨ 東京 &amp; 42!");
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_FALSE(ids->empty());
  for (int32_t id : *ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(static_cast<size_t>(id), tokenizer->vocab_size());
    EXPECT_NE(tokenizer->TokenString(id), "");
  }
}

// ---- Create() validation ----

class ClipTokenizerCreateTest : public ::testing::Test {
 protected:
  // Writes `contents` to a file in the test's temporary directory and returns its path.
  std::string WriteFile(const std::string& name, const std::string& contents) {
    const std::string path = ::testing::TempDir() + "/clip_tokenizer_test_" + name;
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }

  void ExpectInvalid(const ClipTokenizer::Options& options, const std::string& message_part) {
    absl::StatusOr<std::unique_ptr<ClipTokenizer>> tokenizer = ClipTokenizer::Create(options);
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(tokenizer.status().message(), HasSubstr(message_part));
  }
};

TEST_F(ClipTokenizerCreateTest, RejectsMissingAndEmptyPaths) {
  ClipTokenizer::Options options = DefaultOptions();
  options.vocab_path = "/nonexistent/vocab.json";
  ExpectInvalid(options, "/nonexistent/vocab.json");
  options = DefaultOptions();
  options.merges_path = "/nonexistent/merges.txt";
  ExpectInvalid(options, "/nonexistent/merges.txt");
  options = DefaultOptions();
  options.vocab_path = "";
  ExpectInvalid(options, "vocab_path is empty");
}

TEST_F(ClipTokenizerCreateTest, RejectsBadVocabJson) {
  ClipTokenizer::Options options = DefaultOptions();
  options.vocab_path = WriteFile("truncated.json", "{\"a\": 1, ");
  ExpectInvalid(options, "not a JSON object");
  options.vocab_path = WriteFile("array.json", "[1, 2]");
  ExpectInvalid(options, "not a JSON object");
  options.vocab_path = WriteFile("negative.json", "{\"a\": -1}");
  ExpectInvalid(options, "'a' has id -1");
  options.vocab_path = WriteFile("string_id.json", "{\"a\": \"1\"}");
  ExpectInvalid(options, "'a' has id");
  options.vocab_path = WriteFile("duplicate_id.json", "{\"a\": 0, \"b\": 0}");
  ExpectInvalid(options, "id 0 is used twice");
  // Valid JSON, but without the byte alphabet.
  options.vocab_path = WriteFile("no_bytes.json", "{\"a\": 0, \"b\": 1}");
  ExpectInvalid(options, "the symbol of byte 0x00");
}

TEST_F(ClipTokenizerCreateTest, RejectsBadMerges) {
  ClipTokenizer::Options options = DefaultOptions();
  options.merges_path = WriteFile("three.txt", "#version: 0.2\ni n\nt h e\n");
  ExpectInvalid(options, "line 3 't h e': expected two tokens");
  options.merges_path = WriteFile("unknown.txt", "#version: 0.2\ni n\nq\xC3\xA9 zz\n");
  ExpectInvalid(options, "line 3");
  options.merges_path = WriteFile("order.txt", "in g</w>\ni n\n");
  ExpectInvalid(options, "line 2 'i n': creates a token that an earlier merge already uses");
  options.merges_path = WriteFile("duplicate.txt", "i n\nt h\ni n\n");
  ExpectInvalid(options, "line 3 'i n': duplicate merge");
}

TEST_F(ClipTokenizerCreateTest, RejectsSpecialTokensMissingFromTheVocab) {
  ClipTokenizer::Options options = DefaultOptions();
  options.bos_token = "<|nope|>";
  ExpectInvalid(options, "special token '<|nope|>'");
  options = DefaultOptions();
  options.pad_token = "";
  ExpectInvalid(options, "special token ''");
}

TEST_F(ClipTokenizerCreateTest, AcceptsMergesWithoutVersionHeader) {
  ClipTokenizer::Options options = DefaultOptions();
  options.merges_path = WriteFile("few.txt", "c a\nca t</w>\n");
  auto tokenizer = MakeTokenizer(options);
  ASSERT_NE(tokenizer, nullptr);
  // With only these two merges "cat" is "ca" + "t</w>" -> "cat</w>", "cab" stays in pieces.
  EXPECT_THAT(*tokenizer->Encode("cat cab"),
              ElementsAreArray({VocabId("cat</w>"), VocabId("ca"), VocabId("b</w>")}));
}

}  // namespace
}  // namespace dmdserve
