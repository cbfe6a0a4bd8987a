// dmdserve's command-line flags and their conversion into DmdServer::Options.
//
// The flags are defined in server_flags.cc (so that `--help` lists exactly these). Every flag can
// also be set by an environment variable DMDSERVE_<FLAG_IN_CAPS>; a flag given on the command
// line wins. Conversion errors name the flag at fault; checks that need the models (or that the
// engine owns) stay in DmdServer::Create.
//
// Not thread-safe: flags are process-wide; call these from main() before starting threads.
#ifndef DMDSERVE_SERVER_SERVER_FLAGS_H_
#define DMDSERVE_SERVER_SERVER_FLAGS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/server.h"
#include "spdlog/common.h"

namespace dmdserve {

// Sets the program usage message and makes --help / --helpshort list this file's flags. Call
// once per process (absl rejects a second usage message).
void SetServerFlagsUsage();

// Parses argv with a --flag=value prepended for every DMDSERVE_<FLAG> environment variable of a
// server flag, so that the command line wins. Like absl::ParseCommandLine, exits on --help or a
// malformed flag. Returns the positional arguments, argv[0] first.
std::vector<std::string> ParseServerFlags(int argc, char** argv);

// How the process logs (--log_format, --log_level).
struct LoggingOptions {
  // One JSON object a line (server/json_log_formatter.h) instead of text.
  bool json = false;
  spdlog::level::level_enum level = spdlog::level::info;
};

// The logging flags, checked. Errors: InvalidArgument naming the flag and the value.
absl::StatusOr<LoggingOptions> LoggingOptionsFromFlags();

// The server flags as DmdServer::Options (everything but `version`, which is not a flag). Call
// after ParseServerFlags (it asks which flags the command line gave).
// Notices for the operator, such as a deprecated flag in use, are appended to `warnings` (not
// owned; must not be null) for the caller to log once logging is set up. Errors: InvalidArgument
// naming the flag and the value.
absl::StatusOr<DmdServer::Options> OptionsFromFlags(std::vector<std::string>* warnings);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_SERVER_FLAGS_H_
