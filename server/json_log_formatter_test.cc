#include "server/json_log_formatter.h"

#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "spdlog/logger.h"
#include "spdlog/sinks/ostream_sink.h"

namespace dmdserve {
namespace {

TEST(JsonEscapeTest, EscapesWhatJsonRequires) {
  EXPECT_EQ(JsonEscape(R"(a "q" \ b)"), R"(a \"q\" \\ b)");
  EXPECT_EQ(JsonEscape("l1\nl2\t\r\x01"), "l1\\nl2\\t\\r\\u0001");
  EXPECT_EQ(JsonEscape("caf\xC3\xA9"), "caf\xC3\xA9");
}

TEST(JsonEscapeTest, InvalidUtf8BecomesTheReplacementCharacter) {
  // A lone continuation byte, a truncated sequence and a byte never valid in UTF-8.
  EXPECT_EQ(JsonEscape("a\x80"
                       "b\xC3"),
            "a\xEF\xBF\xBD"
            "b\xEF\xBF\xBD");
  EXPECT_EQ(JsonEscape("\xFF"), "\xEF\xBF\xBD");
}

TEST(JsonLogFormatterTest, EveryLineParsesAsJsonWithTheMessageIntact) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  spdlog::logger logger("test", sink);
  logger.set_formatter(MakeJsonLogFormatter());
  const std::string message = "rpc=Generate error=\"model 'x' \\ not served\"\nsecond line";
  logger.info("{}", message);
  logger.warn("plain");
  std::istringstream lines(out.str());
  std::string line;
  ASSERT_TRUE(std::getline(lines, line));
  nlohmann::json first = nlohmann::json::parse(line);
  EXPECT_EQ(first["message"], message);
  EXPECT_EQ(first["level"], "info");
  EXPECT_TRUE(first["thread"].is_number());
  ASSERT_TRUE(std::getline(lines, line));
  EXPECT_EQ(nlohmann::json::parse(line)["level"], "warning");
}

TEST(JsonLogFormatterTest, NonUtf8BytesInAMessageGiveValidJsonWithReplacementCharacters) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  spdlog::logger logger("test", sink);
  logger.set_formatter(MakeJsonLogFormatter());
  logger.info("{}", "prompt=\"caf\xE9 \xFF\xFE\" model=\xC3\xA9");
  std::string line = out.str();
  ASSERT_FALSE(line.empty());
  line.pop_back();  // the newline
  ASSERT_TRUE(nlohmann::json::accept(line)) << line;
  nlohmann::json record = nlohmann::json::parse(line);
  EXPECT_EQ(record["message"],
            "prompt=\"caf\xEF\xBF\xBD \xEF\xBF\xBD\xEF\xBF\xBD\" model=\xC3\xA9");
  const nlohmann::ordered_json in_order = nlohmann::ordered_json::parse(line);
  std::vector<std::string> keys;
  for (const auto& [key, value] : in_order.items()) keys.push_back(key);
  EXPECT_EQ(keys, (std::vector<std::string>{"time", "level", "thread", "message"}));
}

}  // namespace
}  // namespace dmdserve
