#include "server/json_log_formatter.h"

#include <nlohmann/json.hpp>
#include <sstream>

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

}  // namespace
}  // namespace dmdserve
