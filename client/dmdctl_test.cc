// Unit tests of dmdctl's pure parts: argument parsing, options, statistics and output shaping.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/reflection.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/bench.h"
#include "client/cli.h"
#include "client/output.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmdserve::client {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Puts every flag back to its default (quietly, unlike absl::FlagSaver, which logs each restore).
void ResetFlags() {
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    std::string error;
    ASSERT_TRUE(flag->ParseFrom(flag->DefaultValue(), &error)) << name << ": " << error;
  }
}

// Tests that parse flags start from the defaults.
class CliTest : public ::testing::Test {
 protected:
  void SetUp() override { ResetFlags(); }
};

TEST_F(CliTest, SplitsCommandArgumentsAndFlags) {
  absl::StatusOr<CommandLine> line =
      ParseCommandLine({"--target=h:1", "generate", "--num_images", "3", "a cat", "--json"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(line->command, "generate");
  EXPECT_THAT(line->args, ElementsAre("a cat"));
  EXPECT_THAT(line->flags, ElementsAre("target", "num_images", "json"));
  EXPECT_FALSE(line->help);

  absl::StatusOr<GenerateOptions> options = GenerateOptionsFromFlags(line->args);
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->request.prompt(), "a cat");
  EXPECT_EQ(options->request.num_images(), 3);
  EXPECT_TRUE(options->json);
  EXPECT_EQ(ClientOptionsFromFlags(nullptr)->target, "h:1");
}

TEST_F(CliTest, AcceptsEveryFlagForm) {
  absl::StatusOr<CommandLine> line =
      ParseCommandLine({"generate", "-model=m", "--seed", "7", "--stream", "--stream=false",
                        "--json", "--nojson", "--width=64", "-height", "32", "--", "--not a flag"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_THAT(line->args, ElementsAre("--not a flag"));
  absl::StatusOr<GenerateOptions> options = GenerateOptionsFromFlags(line->args);
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->request.model(), "m");
  EXPECT_TRUE(options->request.has_seed());
  EXPECT_EQ(options->request.seed(), 7u);
  EXPECT_FALSE(options->stream);
  EXPECT_FALSE(options->json);
  EXPECT_EQ(options->request.width(), 64);
  EXPECT_EQ(options->request.height(), 32);
  EXPECT_EQ(options->request.prompt(), "--not a flag");
}

TEST_F(CliTest, RejectsBadFlags) {
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"models", "--bogus"},
           {"models", "--nobogus"},
           {"generate", "--num_images=abc", "p"},
           {"generate", "p", "--model"},
           {"generate", "--nomodel", "p"},
           {"generate", "--nostream=1", "p"},
           {"bench", "--concurrency=1.5"},
       }) {
    absl::StatusOr<CommandLine> line = ParseCommandLine(args);
    EXPECT_EQ(line.status().code(), absl::StatusCode::kInvalidArgument) << args[1];
  }
  EXPECT_THAT(ParseCommandLine({"models", "--bogus"}).status().message(), HasSubstr("--bogus"));
  EXPECT_THAT(ParseCommandLine({"generate", "p", "--model"}).status().message(),
              HasSubstr("--model needs a value"));
}

TEST_F(CliTest, RecognisesHelp) {
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--help"}, {"-h"}, {"help"}, {"generate", "--help"}, {"help", "generate"}}) {
    absl::StatusOr<CommandLine> line = ParseCommandLine(args);
    ASSERT_TRUE(line.ok()) << line.status();
    EXPECT_TRUE(line->help) << args[0];
    EXPECT_EQ(line->command, args.size() == 2 ? "generate" : "") << args[0];
  }
}

TEST_F(CliTest, UsageNamesEveryCommandAndFlag) {
  const std::string usage = UsageText();
  for (const char* command : {"generate", "models", "tokenize", "health", "bench"}) {
    EXPECT_TRUE(IsCommand(command));
    EXPECT_THAT(usage, HasSubstr(absl::StrCat("dmdctl ", command)));
  }
  EXPECT_FALSE(IsCommand("help"));
  EXPECT_FALSE(IsCommand("frobnicate"));
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (!absl::StrContains(flag->Filename(), "client/cli.cc")) continue;
    EXPECT_THAT(usage, HasSubstr(absl::StrCat("--", name, "="))) << name;
  }
  const std::string generate = UsageText("generate");
  EXPECT_THAT(generate, HasSubstr("--out_dir=\".\""));
  EXPECT_THAT(generate, ::testing::Not(HasSubstr("--concurrency")));
}

TEST_F(CliTest, ChecksThatFlagsApplyToTheCommand) {
  EXPECT_TRUE(CheckFlagsApply("generate", {"target", "timeout_s", "stream", "json"}).ok());
  EXPECT_TRUE(CheckFlagsApply("bench", {"concurrency", "json", "progress"}).ok());
  const absl::Status status = CheckFlagsApply("tokenize", {"json", "stream"});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("--stream"));
  EXPECT_FALSE(CheckFlagsApply("health", {"json"}).ok());
  EXPECT_FALSE(CheckFlagsApply("generate", {"concurrency"}).ok());
}

TEST(ResolveTargetTest, FlagThenEnvironmentThenDefault) {
  EXPECT_EQ(ResolveTarget("a:1", "b:2"), "a:1");
  EXPECT_EQ(ResolveTarget("", "b:2"), "b:2");
  EXPECT_EQ(ResolveTarget("", ""), "localhost:50051");
  EXPECT_EQ(ResolveTarget("", nullptr), "localhost:50051");
}

TEST_F(CliTest, ClientOptionsValidateTheTimeout) {
  ASSERT_TRUE(ParseCommandLine({"models", "--timeout_s=2.5"}).ok());
  absl::StatusOr<DmdClient::Options> options = ClientOptionsFromFlags("env:9");
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->target, "env:9");
  EXPECT_EQ(options->timeout, absl::Milliseconds(2500));
  for (const char* bad : {"--timeout_s=0", "--timeout_s=-1", "--timeout_s=inf"}) {
    ASSERT_TRUE(ParseCommandLine({"models", bad}).ok()) << bad;
    EXPECT_EQ(ClientOptionsFromFlags(nullptr).status().code(), absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST_F(CliTest, GenerateDefaults) {
  absl::StatusOr<GenerateOptions> options = GenerateOptionsFromFlags({"p"});
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->request.num_images(), 1);
  EXPECT_FALSE(options->request.has_seed());
  EXPECT_EQ(options->request.width(), 0);
  EXPECT_EQ(options->request.height(), 0);
  EXPECT_EQ(options->request.encoding(), v1::IMAGE_ENCODING_PNG);
  EXPECT_EQ(options->request.model(), "");
  EXPECT_EQ(options->request.request_id(), "");
  EXPECT_EQ(options->out_dir, ".");
  EXPECT_EQ(options->prefix, "image");
  EXPECT_FALSE(options->stream);
}

TEST_F(CliTest, GenerateParsesTheFullSeedRangeAndRawEncoding) {
  ASSERT_TRUE(ParseCommandLine({"generate", "--seed=18446744073709551615", "--encoding=raw",
                                "--request_id=r1", "p"})
                  .ok());
  absl::StatusOr<GenerateOptions> options = GenerateOptionsFromFlags({"p"});
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->request.seed(), UINT64_MAX);
  EXPECT_EQ(options->request.encoding(), v1::IMAGE_ENCODING_RAW);
  EXPECT_EQ(options->request.request_id(), "r1");
}

TEST_F(CliTest, GenerateRejectsBadValues) {
  EXPECT_EQ(GenerateOptionsFromFlags({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GenerateOptionsFromFlags({"a", "b"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  for (const char* bad : {"--seed=-1", "--seed=18446744073709551616", "--seed=12x",
                          "--encoding=jpeg", "--width=512", "--height=512", "--width=-8",
                          "--num_images=0", "--prefix=a/b", "--prefix=", "--out_dir="}) {
    ResetFlags();
    ASSERT_TRUE(ParseCommandLine({"generate", bad, "p"}).ok()) << bad;
    absl::StatusOr<GenerateOptions> options = GenerateOptionsFromFlags({"p"});
    EXPECT_EQ(options.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    const std::string flag_name(absl::string_view(bad).substr(2, std::string(bad).find('=') - 2));
    EXPECT_THAT(options.status().message(), HasSubstr(flag_name)) << bad;
  }
}

TEST_F(CliTest, OtherCommandsCheckTheirArguments) {
  EXPECT_TRUE(ModelsOptionsFromFlags({}).ok());
  EXPECT_FALSE(ModelsOptionsFromFlags({"x"}).ok());
  EXPECT_TRUE(HealthOptionsFromFlags({}).ok());
  EXPECT_FALSE(HealthOptionsFromFlags({"x"}).ok());
  EXPECT_FALSE(TokenizeOptionsFromFlags({}).ok());
  ASSERT_TRUE(ParseCommandLine({"tokenize", "--model=m", "--json", "t"}).ok());
  absl::StatusOr<TokenizeOptions> tokenize = TokenizeOptionsFromFlags({"some text"});
  ASSERT_TRUE(tokenize.ok()) << tokenize.status();
  EXPECT_EQ(tokenize->request.model(), "m");
  EXPECT_EQ(tokenize->request.text(), "some text");
  EXPECT_TRUE(tokenize->json);
  ASSERT_TRUE(ParseCommandLine({"health", "--service=dmdserve.v1.ImageGeneration"}).ok());
  EXPECT_EQ(HealthOptionsFromFlags({})->service, "dmdserve.v1.ImageGeneration");
}

TEST_F(CliTest, BenchOptions) {
  absl::StatusOr<BenchOptions> defaults = BenchOptionsFromFlags({}, /*stderr_is_tty=*/false);
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->concurrency, 4);
  EXPECT_EQ(defaults->count, 0);
  EXPECT_EQ(defaults->duration, absl::Seconds(10));
  EXPECT_FALSE(defaults->prompts.empty());
  EXPECT_FALSE(defaults->progress);
  EXPECT_TRUE(BenchOptionsFromFlags({}, /*stderr_is_tty=*/true)->progress);

  const std::string path = ::testing::TempDir() + "/prompts.txt";
  std::ofstream(path) << "# comment\n\nfirst prompt\r\n  second prompt  \n";
  ASSERT_TRUE(ParseCommandLine({"bench", "--prompts_file", path, "--count=5", "--concurrency=2",
                                "--num_images=2", "--seed=9", "--progress"})
                  .ok());
  absl::StatusOr<BenchOptions> options = BenchOptionsFromFlags({}, false);
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_THAT(options->prompts, ElementsAre("first prompt", "second prompt"));
  EXPECT_EQ(options->count, 5);
  EXPECT_EQ(options->concurrency, 2);
  EXPECT_EQ(options->request.num_images(), 2);
  EXPECT_EQ(options->request.seed(), 9u);
  EXPECT_TRUE(options->progress);
  std::remove(path.c_str());
}

TEST_F(CliTest, BenchRejectsBadValues) {
  const std::string empty = ::testing::TempDir() + "/empty_prompts.txt";
  std::ofstream(empty) << "# only a comment\n";
  for (const std::vector<std::string>& flags : std::vector<std::vector<std::string>>{
           {"--concurrency=0"},
           {"--concurrency=1001"},
           {"--count=-1"},
           {"--duration_s=-2"},
           {"--count=3", "--duration_s=2"},
           {"--prompts_file=/nonexistent/prompts.txt"},
           {"--prompts_file=" + empty},
       }) {
    ResetFlags();
    std::vector<std::string> args = {"bench"};
    args.insert(args.end(), flags.begin(), flags.end());
    ASSERT_TRUE(ParseCommandLine(args).ok()) << flags[0];
    EXPECT_EQ(BenchOptionsFromFlags({}, false).status().code(), absl::StatusCode::kInvalidArgument)
        << flags[0];
  }
  EXPECT_FALSE(BenchOptionsFromFlags({"extra"}, false).ok());
  std::remove(empty.c_str());
}

TEST(PercentileTest, NearestRank) {
  const std::vector<double> ten = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  EXPECT_EQ(Percentile(ten, 0), 1);
  EXPECT_EQ(Percentile(ten, 10), 1);
  EXPECT_EQ(Percentile(ten, 11), 2);
  EXPECT_EQ(Percentile(ten, 50), 5);
  EXPECT_EQ(Percentile(ten, 90), 9);
  EXPECT_EQ(Percentile(ten, 99), 10);
  EXPECT_EQ(Percentile(ten, 100), 10);
  EXPECT_EQ(Percentile({0.25}, 50), 0.25);
  EXPECT_EQ(Percentile({0.25}, 99), 0.25);
  std::vector<double> hundred;
  for (int i = 1; i <= 100; ++i) hundred.push_back(i / 100.0);
  EXPECT_EQ(Percentile(hundred, 99), 0.99);
  EXPECT_EQ(Percentile(hundred, 99.5), 1.0);
}

TEST(SummarizeTest, CountsLatenciesAndThroughput) {
  std::vector<RequestRecord> records;
  for (int i = 1; i <= 10; ++i) records.push_back({absl::StatusCode::kOk, i * 0.1, 2});
  records.push_back({absl::StatusCode::kUnavailable, 0.001, 0});
  records.push_back({absl::StatusCode::kResourceExhausted, 0.002, 0});
  records.push_back({absl::StatusCode::kUnavailable, 0.003, 0});
  const BenchSummary summary = Summarize(records, 3, 4.0);
  EXPECT_EQ(summary.concurrency, 3);
  EXPECT_EQ(summary.requests, 13);
  EXPECT_EQ(summary.ok, 10);
  EXPECT_EQ(summary.images, 20);
  EXPECT_DOUBLE_EQ(summary.images_per_second, 5.0);
  EXPECT_DOUBLE_EQ(summary.requests_per_second, 2.5);
  ASSERT_TRUE(summary.latency.has_value());
  EXPECT_DOUBLE_EQ(summary.latency->p50, 0.5);  // failed requests' latencies are left out
  EXPECT_DOUBLE_EQ(summary.latency->p90, 0.9);
  EXPECT_DOUBLE_EQ(summary.latency->p99, 1.0);
  EXPECT_DOUBLE_EQ(summary.latency->max, 1.0);
  EXPECT_DOUBLE_EQ(summary.latency->mean, 0.55);
  EXPECT_EQ(summary.status_codes, (std::map<std::string, int64_t>{
                                      {"OK", 10}, {"RESOURCE_EXHAUSTED", 1}, {"UNAVAILABLE", 2}}));

  const nlohmann::ordered_json json = BenchJson(summary);
  EXPECT_EQ(json["requests"], 13);
  EXPECT_EQ(json["failed"], 3);
  EXPECT_EQ(json["images_per_second"], 5.0);
  EXPECT_EQ(json["latency_seconds"]["p90"], 0.9);
  EXPECT_EQ(json["status_codes"]["UNAVAILABLE"], 2);
  EXPECT_THAT(BenchText(summary), HasSubstr("UNAVAILABLE 2"));
}

TEST(SummarizeTest, NoSuccessfulRequestMeansNoLatency) {
  const BenchSummary summary = Summarize({{absl::StatusCode::kDeadlineExceeded, 60, 0}}, 1, 60.0);
  EXPECT_FALSE(summary.latency.has_value());
  EXPECT_EQ(summary.images_per_second, 0);
  const nlohmann::ordered_json json = BenchJson(summary);
  EXPECT_TRUE(json["latency_seconds"].is_null());
  EXPECT_EQ(json["status_codes"]["DEADLINE_EXCEEDED"], 1);
}

TEST(ProgressBarTest, FillsProportionally) {
  EXPECT_EQ(ProgressBar(0.5, 10, "x"), "[#####.....] x");
  EXPECT_EQ(ProgressBar(-1, 4, ""), "[....] ");
  EXPECT_EQ(ProgressBar(2, 4, "done"), "[####] done");
}

TEST(ImageFileNameTest, NamesByPrefixIndexSeedAndEncoding) {
  EXPECT_EQ(ImageFileName("image", 0, 42, v1::IMAGE_ENCODING_PNG), "image-0-seed42.png");
  EXPECT_EQ(ImageFileName("cat", 3, 45, v1::IMAGE_ENCODING_RAW), "cat-3-seed45.raw");
  EXPECT_EQ(ImageFileName("x", 1, UINT64_MAX, v1::IMAGE_ENCODING_UNSPECIFIED),
            "x-1-seed18446744073709551615.png");
}

v1::GeneratedImage StreamedImage(int index, double queue, double total, double encode, int batch) {
  v1::GeneratedImage image;
  image.set_index(index);
  image.set_seed(100 + index);
  image.set_width(8);
  image.set_height(4);
  image.set_channels(3);
  image.set_model("m");
  image.set_request_id("r");
  image.set_truncated_tokens(5);
  image.set_data("bytes");
  v1::Timings* t = image.mutable_timings();
  t->set_queue_seconds(queue);
  t->set_generator_seconds(total / 2);
  t->set_total_seconds(total);
  t->set_encode_seconds(encode);
  t->set_batch_size(batch);
  return image;
}

TEST(AssembleStreamResponseTest, OrdersImagesAndAggregatesTimings) {
  const v1::GenerateResponse response = AssembleStreamResponse(
      {StreamedImage(2, 0.3, 0.9, 0.01, 2), StreamedImage(0, 0.1, 0.5, 0.02, 4),
       StreamedImage(1, 0.2, 1.5, 0.04, 3)});
  ASSERT_EQ(response.images_size(), 3);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(response.images(i).index(), i);
  EXPECT_EQ(response.images(1).data(), "bytes");
  EXPECT_EQ(response.model(), "m");
  EXPECT_EQ(response.request_id(), "r");
  EXPECT_EQ(response.truncated_tokens(), 5);
  EXPECT_DOUBLE_EQ(response.timings().queue_seconds(), 0.1);       // smallest
  EXPECT_DOUBLE_EQ(response.timings().total_seconds(), 1.5);       // image 1 finished last
  EXPECT_DOUBLE_EQ(response.timings().generator_seconds(), 0.75);  // ... its stage times
  EXPECT_DOUBLE_EQ(response.timings().encode_seconds(), 0.07);     // sum
  EXPECT_EQ(response.timings().batch_size(), 4);                   // largest
  EXPECT_EQ(AssembleStreamResponse({}).images_size(), 0);
}

TEST(GenerateJsonTest, HasTheDocumentedShape) {
  v1::GenerateResponse response;
  response.set_model("m");
  response.set_request_id("r");
  response.set_truncated_tokens(2);
  v1::GeneratedImage* image = response.add_images();
  image->set_index(0);
  image->set_seed(UINT64_MAX);
  image->set_width(8);
  image->set_height(4);
  image->set_channels(1);
  image->set_data("ignored");
  response.mutable_timings()->set_total_seconds(0.25);
  response.mutable_timings()->set_batch_size(3);

  const nlohmann::ordered_json json = GenerateJson(response, {"out/image-0-seed1.png"}, 0.5);
  EXPECT_EQ(DumpJson(json),
            "{\"model\":\"m\",\"request_id\":\"r\",\"images\":[{\"index\":0,"
            "\"seed\":18446744073709551615,\"width\":8,\"height\":4,\"channels\":1,"
            "\"path\":\"out/image-0-seed1.png\"}],\"timings\":{\"queue_seconds\":0.0,"
            "\"text_encoder_seconds\":0.0,\"generator_seconds\":0.0,\"decoder_seconds\":0.0,"
            "\"encode_seconds\":0.0,\"total_seconds\":0.25,\"batch_size\":3,"
            "\"client_seconds\":0.5},\"truncated_tokens\":2}");

  const v1::GenerateResponse streamed =
      AssembleStreamResponse({StreamedImage(0, 0.1, 0.5, 0.02, 4)});
  const nlohmann::ordered_json stream_json = GenerateJson(streamed, {"p"}, 0.6);
  EXPECT_EQ(stream_json["images"][0]["timings"]["total_seconds"], 0.5);

  const std::string text = GenerateText(response, {"out/image-0-seed1.png"}, 0.5);
  EXPECT_THAT(text, HasSubstr("seed 18446744073709551615"));
  EXPECT_THAT(text, HasSubstr("8x4x1"));
  EXPECT_THAT(text, HasSubstr("out/image-0-seed1.png"));
}

TEST(TokenizeJsonTest, HasExactlyTheFourFields) {
  v1::TokenizeResponse response;
  response.set_model("m");
  response.add_ids(320);
  response.add_ids(2368);
  response.add_tokens("a</w>");
  response.add_tokens("cat</w>");
  for (int id : {49406, 320, 2368, 49407, 49407}) response.add_input_ids(id);
  response.set_truncated_tokens(0);
  EXPECT_EQ(DumpJson(TokenizeJson(response)),
            "{\"ids\":[320,2368],\"tokens\":[\"a</w>\",\"cat</w>\"],"
            "\"input_ids\":[49406,320,2368,49407,49407],\"truncated_tokens\":0}");
  const std::string text = TokenizeText(response);
  EXPECT_THAT(text, HasSubstr("2368  cat</w>"));
  EXPECT_THAT(text, HasSubstr("5 ids (BOS, 2 text ids, EOS, 1 padding)"));
}

TEST(ModelsTest, JsonAndTable) {
  v1::ListModelsResponse response;
  v1::ModelInfo* model = response.add_models();
  model->set_name("sd-dmd");
  model->set_is_default(true);
  model->set_ready(true);
  model->set_width(512);
  model->set_height(512);
  model->set_channels(3);
  model->set_steps(1);
  model->set_max_images_per_request(8);
  model->set_max_tokens(77);
  model->set_description("one-step");
  for (int side : {512, 256}) {
    v1::ImageSize* size = model->add_supported_sizes();
    size->set_width(side);
    size->set_height(side);
  }
  v1::DeviceBatching* batching = model->add_batching();
  batching->set_device("cpu");
  batching->set_max_batch_size(4);
  v1::BatchThroughput* measured = batching->add_measured();
  measured->set_batch_size(1);
  measured->set_images_per_second(150.5);
  const nlohmann::ordered_json json = ModelsJson(response);
  ASSERT_EQ(json["models"].size(), 1u);
  const nlohmann::ordered_json& m = json["models"][0];
  EXPECT_EQ(m["name"], "sd-dmd");
  EXPECT_EQ(m["is_default"], true);
  EXPECT_EQ(m["max_images_per_request"], 8);
  EXPECT_EQ(m["supported_sizes"][1]["width"], 256);
  EXPECT_EQ(m["description"], "one-step");
  EXPECT_EQ(m["batching"][0]["device"], "cpu");
  EXPECT_EQ(m["batching"][0]["max_batch_size"], 4);
  EXPECT_EQ(m["batching"][0]["measured"][0]["images_per_second"], 150.5);

  const std::string table = ModelsTable(response);
  EXPECT_THAT(table, HasSubstr("NAME"));
  EXPECT_THAT(table, HasSubstr("512x512,256x256  cpu:4"));
  EXPECT_THAT(table, HasSubstr("MAX_BATCH"));
  EXPECT_THAT(table, HasSubstr("sd-dmd"));
}

TEST(FormatTableTest, PadsColumns) {
  EXPECT_EQ(FormatTable({{"A", "BB", "C"}, {"ccc", "d"}, {"e"}}),
            "A    BB  C\n"
            "ccc  d\n"
            "e\n");
  EXPECT_EQ(FormatTable({}), "");
}

TEST(OutputTest, TruncationWarningAndJsonWithBadUtf8) {
  EXPECT_EQ(TruncationWarning(0), "");
  EXPECT_THAT(TruncationWarning(12), HasSubstr("12 tokens"));
  nlohmann::ordered_json json = {{"s", std::string("a\xff"
                                                   "b")}};
  EXPECT_EQ(DumpJson(json),
            "{\"s\":\"a\xef\xbf\xbd"
            "b\"}");
}

}  // namespace
}  // namespace dmdserve::client
