// dmdctl: command-line client of dmdserve. See docs/CLIENT.md and `dmdctl help`.
#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/bench.h"
#include "client/cli.h"
#include "client/commands.h"
#include "client/dmd_client.h"

namespace dmdserve::client {
namespace {

constexpr int kUsageError = 2;

int UsageError(const absl::Status& status) {
  std::cerr << "error: " << status.message() << "\nRun 'dmdctl help' for usage.\n";
  return kUsageError;
}

// Builds the client and the command's options (exit code 2 on failure), then runs the command.
template <typename Options>
int Run(const absl::StatusOr<Options>& options,
        int (*run)(const DmdClient&, const Options&, std::ostream&, std::ostream&)) {
  if (!options.ok()) return UsageError(options.status());
  absl::StatusOr<DmdClient::Options> client_options =
      ClientOptionsFromFlags(std::getenv("DMDCTL_TARGET"));
  if (!client_options.ok()) return UsageError(client_options.status());
  absl::StatusOr<std::unique_ptr<DmdClient>> client = DmdClient::Create(*client_options);
  if (!client.ok()) return UsageError(client.status());
  return run(**client, *options, std::cout, std::cerr);
}

int Main(const std::vector<std::string>& args) {
  absl::StatusOr<CommandLine> line = ParseCommandLine(args);
  if (!line.ok()) return UsageError(line.status());
  if (line->help) {
    if (!line->command.empty() && !IsCommand(line->command)) {
      return UsageError(absl::InvalidArgumentError("unknown command '" + line->command + "'"));
    }
    std::cout << UsageText(line->command);
    return 0;
  }
  if (!IsCommand(line->command)) {
    if (!line->command.empty()) std::cerr << "error: unknown command '" << line->command << "'\n\n";
    std::cerr << BriefUsageText() << "\nRun 'dmdctl help' for the flags of every command.\n";
    return kUsageError;
  }
  if (absl::Status status = CheckFlagsApply(line->command, line->flags); !status.ok()) {
    return UsageError(status);
  }

  const std::string& command = line->command;
  if (command == "generate") return Run(GenerateOptionsFromFlags(line->args), RunGenerate);
  if (command == "models") return Run(ModelsOptionsFromFlags(line->args), RunModels);
  if (command == "tokenize") return Run(TokenizeOptionsFromFlags(line->args), RunTokenize);
  if (command == "health") return Run(HealthOptionsFromFlags(line->args), RunHealth);
  return Run(BenchOptionsFromFlags(line->args, isatty(STDERR_FILENO) == 1), RunBench);
}

}  // namespace
}  // namespace dmdserve::client

int main(int argc, char** argv) {
  return dmdserve::client::Main(std::vector<std::string>(argv + 1, argv + argc));
}
