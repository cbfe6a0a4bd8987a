// The command-line layer of dmdctl: its absl flags, the parser that sets them, the help text, and
// the conversion of flags into each command's options.
//
// Flags are process-global, so nothing here is thread-safe: call it from main() (tests reset the
// flags to their defaults before each case). The parser is ours rather than absl::ParseCommandLine
// so that usage errors exit with code 2 and each command can reject the flags it does not use.
//
//   absl::StatusOr<CommandLine> line = ParseCommandLine({"generate", "--num_images=2", "a cat"});
//   absl::StatusOr<GenerateOptions> options = GenerateOptionsFromFlags(line->args);
#ifndef DMDSERVE_CLIENT_CLI_H_
#define DMDSERVE_CLIENT_CLI_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/bench.h"
#include "client/commands.h"
#include "client/dmd_client.h"

namespace dmdserve::client {

// Address used when neither --target nor $DMDCTL_TARGET is set.
inline constexpr char kDefaultTarget[] = "localhost:50051";

struct CommandLine {
  std::string command;             // the first positional argument; "" when there is none
  std::vector<std::string> args;   // positional arguments after the command
  std::vector<std::string> flags;  // names of the flags given, in order
  bool help = false;               // --help, -h, or the `help` command (then `command` is its
                                   // argument, if any)
};

// Parses the arguments that follow the program name and sets the flags they name. Flags may
// precede or follow the command, as --name=value, --name value (non-bool flags), --name or
// --noname (bool flags), with one or two leading dashes; "--" ends the flags. INVALID_ARGUMENT
// for an unknown flag or a missing or malformed value.
absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args);

// True for the commands dmdctl knows (generate, models, tokenize, health, bench).
bool IsCommand(absl::string_view name);

// The full help, or only that of `command` (one of IsCommand's).
std::string UsageText(absl::string_view command = "");

// The start of the full help: synopsis, commands and global flags.
std::string BriefUsageText();

// INVALID_ARGUMENT naming the first of `flags` that `command` does not use.
absl::Status CheckFlagsApply(absl::string_view command, const std::vector<std::string>& flags);

// --target when set, else `env_target` ($DMDCTL_TARGET) when non-null and non-empty, else
// kDefaultTarget.
std::string ResolveTarget(absl::string_view flag_target, const char* env_target);

// The options of each part, from the flags (and the command's positional `args`). Errors are
// INVALID_ARGUMENT and name the flag or argument at fault.
absl::StatusOr<DmdClient::Options> ClientOptionsFromFlags(const char* env_target);
absl::StatusOr<GenerateOptions> GenerateOptionsFromFlags(const std::vector<std::string>& args);
absl::StatusOr<ModelsOptions> ModelsOptionsFromFlags(const std::vector<std::string>& args);
absl::StatusOr<TokenizeOptions> TokenizeOptionsFromFlags(const std::vector<std::string>& args);
absl::StatusOr<HealthOptions> HealthOptionsFromFlags(const std::vector<std::string>& args);
// Reads --prompts_file. The progress bar is on when --progress is set or `stderr_is_tty`.
absl::StatusOr<BenchOptions> BenchOptionsFromFlags(const std::vector<std::string>& args,
                                                   bool stderr_is_tty);

}  // namespace dmdserve::client

#endif  // DMDSERVE_CLIENT_CLI_H_
