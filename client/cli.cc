#include "client/cli.h"

#include <cstdlib>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "client/output.h"

// Global flags.
ABSL_FLAG(std::string, target, "",
          "Server address (a gRPC target such as host:port); when empty: $DMDCTL_TARGET, else "
          "localhost:50051.");
ABSL_FLAG(double, timeout_s, 60, "Deadline of each call, in seconds (> 0).");
ABSL_FLAG(std::string, tls_ca_file, "",
          "PEM CA bundle to verify the server's TLS certificate with; set: connect with TLS.");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM client certificate for servers that require one (mutual TLS), with --tls_key_file.");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file.");
ABSL_FLAG(std::string, api_key, "",
          "API key for servers started with --api_keys_file; when empty: $DMDSERVE_API_KEY. "
          "(The environment keeps the key out of the process list.)");
// Command flags.
ABSL_FLAG(std::string, model, "", "Model name (see `dmdctl models`); empty: the server's default.");
ABSL_FLAG(int32_t, num_images, 1, "Images per request (>= 1).");
ABSL_FLAG(std::string, seed, "",
          "Seed of image 0 (image i uses seed + i), an unsigned 64-bit integer; empty: the server "
          "draws one (generate), a random base (bench).");
ABSL_FLAG(int32_t, width, 0,
          "Image width in pixels; 0: the model's default. Set together with --height.");
ABSL_FLAG(int32_t, height, 0,
          "Image height in pixels; 0: the model's default. Set together with --width.");
ABSL_FLAG(std::string, encoding, "png",
          "Image encoding: png, or raw (uint8 height x width x channels, no header).");
ABSL_FLAG(std::string, out_dir, ".", "Directory the images are written to (created if missing).");
ABSL_FLAG(std::string, prefix, "image",
          "Image file name prefix (no '/'): <prefix>-<index>-seed<seed>.png or .raw.");
ABSL_FLAG(bool, stream, false, "Use GenerateStream and write each image as soon as it arrives.");
ABSL_FLAG(std::string, request_id, "",
          "Request id echoed by the server and in its logs (at most 128 printable ASCII bytes).");
ABSL_FLAG(bool, json, false, "Print exactly one JSON object on stdout instead of text.");
ABSL_FLAG(std::string, service, "", "Service to check; empty: the whole server.");
ABSL_FLAG(int32_t, concurrency, 4, "Requests in flight at once (1..1000).");
ABSL_FLAG(double, duration_s, 0,
          "Send requests for this many seconds (default 10 when --count is not set).");
ABSL_FLAG(int64_t, count, 0, "Send exactly this many requests instead of running for a duration.");
ABSL_FLAG(std::string, prompts_file, "",
          "File of prompts, one per line, used in turn (blank lines and lines starting with # are "
          "skipped); empty: a built-in list.");
ABSL_FLAG(bool, progress, false,
          "Draw the progress bar on stderr even when stderr is not a terminal.");

namespace dmdserve::client {
namespace {

constexpr int kMaxConcurrency = 1000;
constexpr double kDefaultBenchSeconds = 10;

struct CommandSpec {
  const char* name;
  const char* synopsis;
  const char* summary;
  std::vector<std::string> flags;
};

const std::vector<std::string>& GlobalFlags() {
  static const auto* flags = new std::vector<std::string>{
      "target", "timeout_s", "tls_ca_file", "tls_cert_file", "tls_key_file", "api_key"};
  return *flags;
}

const std::vector<CommandSpec>& Commands() {
  static const auto* commands = new std::vector<CommandSpec>{
      {"generate",
       "generate [flags] PROMPT",
       "Generates images and writes them to --out_dir (GenerateStream with --stream).",
       {"model", "num_images", "seed", "width", "height", "encoding", "out_dir", "prefix", "stream",
        "json", "request_id"}},
      {"models", "models [--json]", "Lists the models the server serves (ListModels).", {"json"}},
      {"tokenize",
       "tokenize [flags] TEXT",
       "Shows how a model tokenizes TEXT, 77-token truncation included.",
       {"model", "json"}},
      {"health",
       "health [--service=NAME]",
       "Checks grpc.health.v1 and prints the status; exit code 0 only when SERVING.",
       {"service"}},
      {"bench",
       "bench [flags]",
       "Load-tests Generate; prints throughput, latency percentiles and status codes.",
       {"concurrency", "duration_s", "count", "prompts_file", "model", "num_images", "seed",
        "width", "height", "encoding", "json", "progress"}},
  };
  return *commands;
}

const CommandSpec* FindCommand(absl::string_view name) {
  for (const CommandSpec& spec : Commands()) {
    if (name == spec.name) return &spec;
  }
  return nullptr;
}

// "  --name=default" and the flag's help, as a table row.
std::vector<std::string> FlagRow(const std::string& name) {
  const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
  std::string default_value = flag->DefaultValue();
  if (flag->IsOfType<std::string>()) default_value = absl::StrCat("\"", default_value, "\"");
  return {absl::StrCat("  --", name, "=", default_value), flag->Help()};
}

std::string CommandHelp(const CommandSpec& spec) {
  std::string text = absl::StrCat("dmdctl ", spec.synopsis, "\n  ", spec.summary, "\n");
  std::vector<std::vector<std::string>> rows;
  for (const std::string& name : spec.flags) rows.push_back(FlagRow(name));
  return text + FormatTable(rows);
}

absl::Status ExpectArgs(absl::string_view command, const std::vector<std::string>& args,
                        size_t expected, absl::string_view what) {
  if (args.size() == expected) return absl::OkStatus();
  if (expected == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(command, " takes no arguments, got '", absl::StrJoin(args, "' '"), "'"));
  }
  return absl::InvalidArgumentError(absl::StrCat(command, " needs exactly one ", what,
                                                 " argument (quote it), got ", args.size()));
}

absl::StatusOr<v1::ImageEncoding> EncodingFromFlag() {
  const std::string encoding = absl::GetFlag(FLAGS_encoding);
  if (encoding == "png") return v1::IMAGE_ENCODING_PNG;
  if (encoding == "raw") return v1::IMAGE_ENCODING_RAW;
  return absl::InvalidArgumentError(
      absl::StrCat("--encoding must be png or raw, got '", encoding, "'"));
}

// Fills the request fields shared by generate and bench: model, num_images, seed, size, encoding.
absl::Status FillGenerateRequest(v1::GenerateRequest* request) {
  request->set_model(absl::GetFlag(FLAGS_model));
  const int num_images = absl::GetFlag(FLAGS_num_images);
  if (num_images < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--num_images must be >= 1, got ", num_images));
  }
  request->set_num_images(num_images);
  const std::string seed = absl::GetFlag(FLAGS_seed);
  if (!seed.empty()) {
    uint64_t value = 0;
    if (!absl::SimpleAtoi(seed, &value) || absl::StartsWith(seed, "-")) {
      return absl::InvalidArgumentError(
          absl::StrCat("--seed must be an unsigned 64-bit integer, got '", seed, "'"));
    }
    request->set_seed(value);
  }
  const int width = absl::GetFlag(FLAGS_width);
  const int height = absl::GetFlag(FLAGS_height);
  if (width < 0 || height < 0 || (width == 0) != (height == 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--width and --height must be both 0 (model default) or both > 0, got --width=", width,
        " --height=", height));
  }
  request->set_width(width);
  request->set_height(height);
  absl::StatusOr<v1::ImageEncoding> encoding = EncodingFromFlag();
  if (!encoding.ok()) return encoding.status();
  request->set_encoding(*encoding);
  return absl::OkStatus();
}

std::vector<std::string> DefaultPrompts() {
  return {
      "a photo of a red fox sitting in fresh snow, golden hour",
      "an astronaut riding a horse on the moon, detailed illustration",
      "a bowl of ramen on a wooden table, studio lighting",
      "a watercolor painting of a lighthouse on a rocky coast",
      "a futuristic city skyline at night with neon lights and rain",
      "a close-up portrait of an old fisherman, black and white photograph",
      "a cozy reading nook with plants and warm sunlight",
      "a low-poly 3d render of a mountain lake",
  };
}

absl::StatusOr<std::vector<std::string>> ReadPrompts(const std::string& path) {
  std::ifstream file(path);
  if (!file) return absl::InvalidArgumentError(absl::StrCat("--prompts_file: cannot read ", path));
  std::vector<std::string> prompts;
  std::string line;
  while (std::getline(file, line)) {
    const absl::string_view prompt = absl::StripAsciiWhitespace(line);
    if (prompt.empty() || absl::StartsWith(prompt, "#")) continue;
    prompts.emplace_back(prompt);
  }
  if (file.bad())
    return absl::InvalidArgumentError(absl::StrCat("--prompts_file: error reading ", path));
  if (prompts.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--prompts_file: no prompt in ", path));
  }
  return prompts;
}

}  // namespace

absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args) {
  CommandLine line;
  std::vector<std::string> positional;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--") {
      positional.insert(positional.end(), args.begin() + i + 1, args.end());
      break;
    }
    if (arg.size() < 2 || arg[0] != '-') {
      positional.push_back(arg);
      continue;
    }
    absl::string_view body = arg;
    if (!absl::ConsumePrefix(&body, "--")) absl::ConsumePrefix(&body, "-");
    const size_t equals = body.find('=');
    const std::string name(body.substr(0, equals));
    const bool has_value = equals != absl::string_view::npos;
    if (name == "help" || name == "h") {
      line.help = true;
      continue;
    }
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    std::string value;
    if (flag == nullptr) {
      // --noname sets the bool flag `name` to false.
      absl::CommandLineFlag* negated =
          absl::StartsWith(name, "no") ? absl::FindCommandLineFlag(name.substr(2)) : nullptr;
      if (negated == nullptr || !negated->IsOfType<bool>()) {
        return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
      }
      if (has_value) return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      flag = negated;
      value = "false";
    } else if (has_value) {
      value = std::string(body.substr(equals + 1));
    } else if (flag->IsOfType<bool>()) {
      value = "true";
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
    }
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag->Name(), ": ", error));
    }
    line.flags.emplace_back(flag->Name());
  }
  if (!positional.empty()) {
    line.command = positional.front();
    line.args.assign(positional.begin() + 1, positional.end());
  }
  if (line.command == "help") {
    line.help = true;
    line.command = line.args.empty() ? "" : line.args.front();
    line.args.clear();
  }
  return line;
}

bool IsCommand(absl::string_view name) { return FindCommand(name) != nullptr; }

std::string BriefUsageText() {
  std::string text =
      "dmdctl: command-line client of the dmdserve text-to-image server.\n\n"
      "Usage: dmdctl [--target=HOST:PORT] [--timeout_s=SECONDS] COMMAND [flags] [args]\n\n"
      "Commands:\n";
  std::vector<std::vector<std::string>> rows;
  for (const CommandSpec& spec : Commands())
    rows.push_back({absl::StrCat("  ", spec.name), spec.summary});
  rows.push_back({"  help [COMMAND]", "Prints this help, or that of one command."});
  text += FormatTable(rows) + "\nGlobal flags:\n";
  rows.clear();
  for (const std::string& name : GlobalFlags()) rows.push_back(FlagRow(name));
  return text + FormatTable(rows);
}

std::string UsageText(absl::string_view command) {
  if (const CommandSpec* spec = FindCommand(command)) return CommandHelp(*spec);
  std::string text = BriefUsageText();
  for (const CommandSpec& spec : Commands()) text += "\n" + CommandHelp(spec);
  text +=
      "\nFlags may come before or after the command: --name=value, --name value, --name and\n"
      "--noname for true/false flags; \"--\" ends the flags (for a prompt that starts with -).\n"
      "Exit codes: 0 success; 1 failed call (\"error: CODE: message\" on stderr), server not\n"
      "SERVING (health) or some failed requests (bench); 2 usage error.\n";
  return text;
}

absl::Status CheckFlagsApply(absl::string_view command, const std::vector<std::string>& flags) {
  const CommandSpec* spec = FindCommand(command);
  for (const std::string& flag : flags) {
    const auto uses = [&flag](const std::vector<std::string>& names) {
      return std::find(names.begin(), names.end(), flag) != names.end();
    };
    if (uses(GlobalFlags()) || (spec != nullptr && uses(spec->flags))) continue;
    return absl::InvalidArgumentError(
        absl::StrCat("flag --", flag, " does not apply to the ", command, " command"));
  }
  return absl::OkStatus();
}

std::string ResolveTarget(absl::string_view flag_target, const char* env_target) {
  if (!flag_target.empty()) return std::string(flag_target);
  if (env_target != nullptr && env_target[0] != '\0') return env_target;
  return kDefaultTarget;
}

absl::StatusOr<DmdClient::Options> ClientOptionsFromFlags(const char* env_target) {
  DmdClient::Options options;
  options.target = ResolveTarget(absl::GetFlag(FLAGS_target), env_target);
  const double timeout_s = absl::GetFlag(FLAGS_timeout_s);
  if (!(timeout_s > 0) || !std::isfinite(timeout_s)) {
    return absl::InvalidArgumentError(absl::StrCat("--timeout_s must be > 0, got ", timeout_s));
  }
  options.timeout = absl::Seconds(timeout_s);
  options.tls_ca_file = absl::GetFlag(FLAGS_tls_ca_file);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  options.api_key = absl::GetFlag(FLAGS_api_key);
  if (const char* env_key = std::getenv("DMDSERVE_API_KEY");
      options.api_key.empty() && env_key != nullptr) {
    options.api_key = env_key;
  }
  return options;
}

absl::StatusOr<GenerateOptions> GenerateOptionsFromFlags(const std::vector<std::string>& args) {
  if (absl::Status s = ExpectArgs("generate", args, 1, "PROMPT"); !s.ok()) return s;
  GenerateOptions options;
  options.request.set_prompt(args.front());
  if (absl::Status s = FillGenerateRequest(&options.request); !s.ok()) return s;
  options.request.set_request_id(absl::GetFlag(FLAGS_request_id));
  options.out_dir = absl::GetFlag(FLAGS_out_dir);
  if (options.out_dir.empty()) return absl::InvalidArgumentError("--out_dir is empty");
  options.prefix = absl::GetFlag(FLAGS_prefix);
  if (options.prefix.empty() || absl::StrContains(options.prefix, '/')) {
    return absl::InvalidArgumentError(
        absl::StrCat("--prefix must be non-empty and without '/', got '", options.prefix, "'"));
  }
  options.stream = absl::GetFlag(FLAGS_stream);
  options.json = absl::GetFlag(FLAGS_json);
  return options;
}

absl::StatusOr<ModelsOptions> ModelsOptionsFromFlags(const std::vector<std::string>& args) {
  if (absl::Status s = ExpectArgs("models", args, 0, ""); !s.ok()) return s;
  ModelsOptions options;
  options.json = absl::GetFlag(FLAGS_json);
  return options;
}

absl::StatusOr<TokenizeOptions> TokenizeOptionsFromFlags(const std::vector<std::string>& args) {
  if (absl::Status s = ExpectArgs("tokenize", args, 1, "TEXT"); !s.ok()) return s;
  TokenizeOptions options;
  options.request.set_model(absl::GetFlag(FLAGS_model));
  options.request.set_text(args.front());
  options.json = absl::GetFlag(FLAGS_json);
  return options;
}

absl::StatusOr<HealthOptions> HealthOptionsFromFlags(const std::vector<std::string>& args) {
  if (absl::Status s = ExpectArgs("health", args, 0, ""); !s.ok()) return s;
  HealthOptions options;
  options.service = absl::GetFlag(FLAGS_service);
  return options;
}

absl::StatusOr<BenchOptions> BenchOptionsFromFlags(const std::vector<std::string>& args,
                                                   bool stderr_is_tty) {
  if (absl::Status s = ExpectArgs("bench", args, 0, ""); !s.ok()) return s;
  BenchOptions options;
  if (absl::Status s = FillGenerateRequest(&options.request); !s.ok()) return s;
  options.concurrency = absl::GetFlag(FLAGS_concurrency);
  if (options.concurrency < 1 || options.concurrency > kMaxConcurrency) {
    return absl::InvalidArgumentError(absl::StrCat("--concurrency must be in 1..", kMaxConcurrency,
                                                   ", got ", options.concurrency));
  }
  options.count = absl::GetFlag(FLAGS_count);
  const double duration_s = absl::GetFlag(FLAGS_duration_s);
  if (options.count < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--count must be >= 0, got ", options.count));
  }
  if (!(duration_s >= 0) || !std::isfinite(duration_s)) {
    return absl::InvalidArgumentError(absl::StrCat("--duration_s must be >= 0, got ", duration_s));
  }
  if (options.count > 0 && duration_s > 0) {
    return absl::InvalidArgumentError("set --duration_s or --count, not both");
  }
  options.duration = absl::Seconds(duration_s > 0 ? duration_s : kDefaultBenchSeconds);
  const std::string prompts_file = absl::GetFlag(FLAGS_prompts_file);
  if (prompts_file.empty()) {
    options.prompts = DefaultPrompts();
  } else {
    absl::StatusOr<std::vector<std::string>> prompts = ReadPrompts(prompts_file);
    if (!prompts.ok()) return prompts.status();
    options.prompts = *std::move(prompts);
  }
  options.json = absl::GetFlag(FLAGS_json);
  options.progress = absl::GetFlag(FLAGS_progress) || stderr_is_tty;
  return options;
}

}  // namespace dmdserve::client
