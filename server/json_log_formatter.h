// JSON log lines for spdlog: `--log_format=json` writes one JSON object per line
// {"time":…,"level":…,"thread":…,"message":…}, with the message escaped per RFC 8259 so that
// quotes, backslashes, control characters and invalid UTF-8 in requests' error messages keep every
// line valid.
#ifndef DMDSERVE_SERVER_JSON_LOG_FORMATTER_H_
#define DMDSERVE_SERVER_JSON_LOG_FORMATTER_H_

#include <memory>
#include <string>
#include <string_view>

namespace spdlog {
class formatter;
}

namespace dmdserve {

// `s` as the inside of a JSON string (no surrounding quotes). Valid UTF-8 passes through
// unescaped; each invalid byte becomes U+FFFD, so the result is always valid JSON. Never throws.
std::string JsonEscape(std::string_view s);

// A formatter writing the line shape above; install with spdlog::set_formatter().
std::unique_ptr<spdlog::formatter> MakeJsonLogFormatter();

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_JSON_LOG_FORMATTER_H_
