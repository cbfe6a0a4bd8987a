#include "server/json_log_formatter.h"

#include <nlohmann/json.hpp>
#include <string>

#include "spdlog/pattern_formatter.h"

namespace dmdserve {
namespace {

// %* in a pattern: the JSON-escaped log message.
class EscapedMessageFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    const std::string escaped =
        JsonEscape(std::string_view(msg.payload.data(), msg.payload.size()));
    dest.append(escaped.data(), escaped.data() + escaped.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<EscapedMessageFlag>();
  }
};

}  // namespace

std::string JsonEscape(std::string_view s) {
  // dump() writes a quoted JSON string; with `replace` it never throws on invalid UTF-8.
  const nlohmann::json value = std::string(s);
  const std::string quoted = value.dump(/*indent=*/-1, /*indent_char=*/' ', /*ensure_ascii=*/false,
                                        nlohmann::json::error_handler_t::replace);
  return quoted.substr(1, quoted.size() - 2);
}

std::unique_ptr<spdlog::formatter> MakeJsonLogFormatter() {
  auto formatter = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
  formatter->add_flag<EscapedMessageFlag>('*').set_pattern(
      R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","thread":%t,"message":"%*"})");
  return formatter;
}

}  // namespace dmdserve
