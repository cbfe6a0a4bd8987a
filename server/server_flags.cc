#include "server/server_flags.h"

#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/internal/parse.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

ABSL_FLAG(std::string, listen_host, "0.0.0.0", "Address to listen on (gRPC, HTTP API and /metrics).");
ABSL_FLAG(int, port, 50051, "gRPC port; 0 picks a free port (logged at startup).");
ABSL_FLAG(int, metrics_port, 9464, "Prometheus /metrics port; 0 picks a free port (logged).");
ABSL_FLAG(int, http_port, 8080,
          "HTTP/JSON API port (OpenAI-compatible /v1/images/generations and /v1/models, the native "
          "API as JSON under /v1/generate, /v1/generate:stream, /v1/models:list, /v1/tokenize, "
          "and the playground page at /); 0 picks a free port (logged), -1 turns it off. HTTPS when "
          "--tls_cert_file is set.");
ABSL_FLAG(int, http_max_body_bytes, 64 << 10,
          "Largest HTTP request body, in bytes (larger: 413).");
ABSL_FLAG(std::string, http_model_aliases, "",
          "HTTP API model aliases, comma-separated ALIAS=MODEL (e.g. gpt-image-1=fashion-dmd): "
          "a request naming ALIAS gets MODEL.");
ABSL_FLAG(std::vector<std::string>, model_dirs,
          (std::vector<std::string>{"models/fashion-dmd", "models/fashion-teacher"}),
          "Comma-separated model bundle directories (each with a model.json).");
ABSL_FLAG(std::string, default_model, "",
          "Model used when a request names none; empty: the first bundle's model.");
ABSL_FLAG(std::string, device, "cpu",
          "libtorch device: cpu, or cuda:N in a CUDA build; --devices, when given, wins.");
ABSL_FLAG(std::vector<std::string>, devices, {},
          "Comma-separated devices, one worker group each: cpu, cuda:N (or just N), or all "
          "(every visible GPU). Empty: --device.");
ABSL_FLAG(int, instances_per_device, 0,
          "Execution instances per model and device: model-worker threads, each running one batch "
          "at a time on its own instance (on a GPU: its own CUDA stream and CUDA graphs). 0: "
          "derived from the CPUs the process may use (affinity and cgroup quota) when serving on "
          "the CPU (2 CPUs: 2, 8: 4, 64: 4), else 1. Logged at start-up.");
ABSL_FLAG(int, workers, 1,
          "Deprecated: use --instances_per_device (which wins when both are given). Still "
          "accepted, with a warning at start-up.");
ABSL_FLAG(bool, cuda_graphs, true,
          "GPUs: capture a CUDA graph per batch size at warm-up and pad batches up to them.");
ABSL_FLAG(std::string, dtype, "",
          "Override the manifests' dtypes: float32, float16 or bfloat16 for every component, or "
          "component=dtype pairs (e.g. generator=float16,decoder=float32). Empty: the manifests'.");
ABSL_FLAG(std::string, postprocess, "torch",
          "Decoded image to uint8 pixels: torch (libtorch ops) or cuda_kernel (dmdserve's CUDA "
          "kernel; CUDA builds on GPUs).");
ABSL_FLAG(int, intra_op_threads, 0,
          "libtorch intra-op threads (process-wide). 0: the usable CPUs divided among the CPU "
          "model workers (2 CPUs: 1, 64: 16). Logged at start-up.");
ABSL_FLAG(bool, channels_last_decoder, true,
          "CPU: store the decoders' convolution weights channels-last (NHWC) at load, which "
          "oneDNN runs without layout reorders (see docs/PERFORMANCE.md). Ignored on GPUs.");
ABSL_FLAG(bool, malloc_tuning, true,
          "Keep freed activations in the process (glibc malloc: mmap threshold 32 MiB, trim "
          "threshold 256 MiB) instead of returning them to the kernel after every batch.");
ABSL_FLAG(bool, jit_optimize, true,
          "TorchScript graph-executor optimisation (libtorch's default); turning it off can help "
          "graphs that re-specialise when batch sizes vary (see docs/PERFORMANCE.md).");
ABSL_FLAG(int, max_batch_size, 0,
          "Largest batch in images, capped at the model's largest. 0: chosen per model and device "
          "at warm-up by timing the model's batch sizes, where the per-image time stops falling "
          "(reported by ListModels and dmdserve_max_batch_size_images).");
ABSL_FLAG(int, batch_tuning_ms, 250,
          "With --max_batch_size=0: how long warm-up times each candidate batch size (at least "
          "one batch per worker), in milliseconds.");
ABSL_FLAG(int, max_queue_delay_us, 0,
          "Microseconds the oldest queued image may wait for its batch to fill; 0: a free worker "
          "takes what is queued (batches still form under load; see docs/PERFORMANCE.md).");
ABSL_FLAG(int, max_queue_images, 256,
          "Images queued per model before requests get RESOURCE_EXHAUSTED.");
ABSL_FLAG(std::vector<std::string>, allowed_batch_sizes, {},
          "Optional ascending batch sizes to pad batches up to (e.g. 1,2,4,8); empty: no padding.");
ABSL_FLAG(int, max_images_per_request, 0,
          "Largest num_images per request; 0: each model's own limit (from its manifest).");
ABSL_FLAG(int, warmup_runs, 2,
          "Warm-up passes over every batch size before a model reports ready (health SERVING).");
ABSL_FLAG(int, encode_threads, 2, "PNG encoder threads (never the model workers).");
ABSL_FLAG(int, png_compression_level, 1, "zlib compression level for PNG, 0 (none) to 9.");
ABSL_FLAG(int, max_prompt_bytes, 4096, "Longest prompt accepted, in bytes.");
ABSL_FLAG(int, max_receive_message_bytes, 4 << 20, "Largest request message, in bytes.");
ABSL_FLAG(int, max_send_message_bytes, 256 << 20, "Largest response message, in bytes.");
ABSL_FLAG(int, drain_grace_s, 30,
          "Seconds accepted requests may take to finish after SIGTERM before being cancelled.");
ABSL_FLAG(bool, reflection, true, "Serve gRPC server reflection (grpc.reflection.v1alpha).");
ABSL_FLAG(std::string, api_keys_file, "",
          "File of API keys, one 'NAME SHA256HEX [IMAGES_PER_SECOND]' a line: clients must send "
          "'authorization: Bearer KEY'; re-read on SIGHUP. Empty: no keys.");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM certificate chain: the gRPC and HTTP ports speak TLS only (with --tls_key_file); "
          "empty: plaintext.");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file.");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "PEM CA bundle: clients must present a certificate it signed (mutual TLS).");
ABSL_FLAG(int, tls_refresh_s, 60,
          "How often the TLS files are re-read while serving, in seconds (renewed certificates "
          "take effect without a restart; open connections stay).");
ABSL_FLAG(std::string, log_level, "info",
          "Log level: trace, debug, info (one line per request), warn, error, off.");
ABSL_FLAG(std::string, log_format, "text", "Log format: text or json (one JSON object a line).");

namespace dmdserve {
namespace {

// The file defining the server flags, as absl reports it (a path ending like this).
constexpr absl::string_view kFlagsFile = "server/server_flags.cc";

bool IsServerFlagFile(absl::string_view file) { return absl::EndsWith(file, kFlagsFile); }

// argv with --flag=value prepended for every DMDSERVE_<FLAG> environment variable, so that flags
// given on the command line (later on the line) win.
std::vector<std::string> ArgsWithEnvironment(int argc, char** argv) {
  std::vector<std::string> args = {argv[0]};
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (!IsServerFlagFile(flag->Filename())) continue;
    const char* value = std::getenv(absl::StrCat("DMDSERVE_", absl::AsciiStrToUpper(name)).c_str());
    if (value != nullptr) args.push_back(absl::StrCat("--", name, "=", value));
  }
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  return args;
}

absl::StatusOr<std::vector<int>> ParseBatchSizes(const std::vector<std::string>& values) {
  std::vector<int> sizes;
  for (const std::string& v : values) {
    int n = 0;
    if (!absl::SimpleAtoi(v, &n)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--allowed_batch_sizes: '", v, "' is not an integer"));
    }
    sizes.push_back(n);
  }
  return sizes;
}

// Whether the last parse saw `name` on its command line (DMDSERVE_<FLAG> variables included).
// CommandLineFlag::IsSpecifiedOnCommandLine is private in the abseil that dmdserve builds with
// (Debian 12's 20220623), so this asks the parser's own record.
bool GivenOnCommandLine(absl::string_view name) {
  return absl::flags_internal::WasPresentOnCommandLine(name);
}

// --instances_per_device, or the deprecated --workers when only that one is given.
absl::StatusOr<int> InstancesPerDevice(std::vector<std::string>& warnings) {
  const int instances = absl::GetFlag(FLAGS_instances_per_device);
  if (instances < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--instances_per_device must be >= 0 (0: derived), got ", instances));
  }
  if (!GivenOnCommandLine("workers")) return instances;
  if (GivenOnCommandLine("instances_per_device")) {
    warnings.push_back(absl::StrCat(
        "--workers is deprecated and ignored since --instances_per_device is also given; using "
        "--instances_per_device=",
        instances));
    return instances;
  }
  const int workers = absl::GetFlag(FLAGS_workers);
  warnings.push_back(
      absl::StrCat("--workers is deprecated: use --instances_per_device=", workers, " instead"));
  // Not checked here: the engine rejects negative values (instances_per_device must be >= 0).
  return workers;
}

absl::StatusOr<Engine::Options> EngineOptionsFromFlags(std::vector<std::string>& warnings) {
  Engine::Options e;
  e.model_dirs = absl::GetFlag(FLAGS_model_dirs);
  e.default_model = absl::GetFlag(FLAGS_default_model);
  e.devices = absl::GetFlag(FLAGS_devices);
  if (e.devices.empty()) e.devices = {absl::GetFlag(FLAGS_device)};
  absl::StatusOr<int> instances = InstancesPerDevice(warnings);
  if (!instances.ok()) return instances.status();
  e.instances_per_device = *instances;
  e.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  e.dtype = absl::GetFlag(FLAGS_dtype);
  e.postprocess = absl::GetFlag(FLAGS_postprocess);
  e.intra_op_threads = absl::GetFlag(FLAGS_intra_op_threads);
  e.tune_malloc = absl::GetFlag(FLAGS_malloc_tuning);
  e.channels_last_decoder = absl::GetFlag(FLAGS_channels_last_decoder);
  e.jit_optimize = absl::GetFlag(FLAGS_jit_optimize);
  e.max_batch_size = absl::GetFlag(FLAGS_max_batch_size);
  e.batch_tuning_time = absl::Milliseconds(absl::GetFlag(FLAGS_batch_tuning_ms));
  e.max_queue_delay = absl::Microseconds(absl::GetFlag(FLAGS_max_queue_delay_us));
  e.max_queued_images = absl::GetFlag(FLAGS_max_queue_images);
  absl::StatusOr<std::vector<int>> batch_sizes =
      ParseBatchSizes(absl::GetFlag(FLAGS_allowed_batch_sizes));
  if (!batch_sizes.ok()) return batch_sizes.status();
  e.allowed_batch_sizes = *std::move(batch_sizes);
  e.max_images_per_request = absl::GetFlag(FLAGS_max_images_per_request);
  e.warmup_runs = absl::GetFlag(FLAGS_warmup_runs);
  e.encode_threads = absl::GetFlag(FLAGS_encode_threads);
  e.png_compression_level = absl::GetFlag(FLAGS_png_compression_level);
  return e;
}

absl::Status HttpOptionsFromFlags(DmdServer::Options& options) {
  options.http_port = absl::GetFlag(FLAGS_http_port);
  if (options.http_port < -1 || options.http_port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--http_port must be in [0, 65535], or -1 (off), got ", options.http_port));
  }
  options.http_max_body_bytes = absl::GetFlag(FLAGS_http_max_body_bytes);
  if (options.http_max_body_bytes < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--http_max_body_bytes must be >= 1, got ",
                                                   options.http_max_body_bytes));
  }
  absl::StatusOr<ModelAliases> aliases = ParseModelAliases(absl::GetFlag(FLAGS_http_model_aliases));
  if (!aliases.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http_model_aliases: ", aliases.status().message()));
  }
  options.http_model_aliases = *std::move(aliases);
  return absl::OkStatus();
}

}  // namespace

void SetServerFlagsUsage() {
  absl::SetProgramUsageMessage(
      "gRPC text-to-image server for one-step (DMD) models.\n"
      "Usage: dmdserve [--flags]   (every flag also reads DMDSERVE_<FLAG> from the environment)");
  // --help lists this file's flags (absl otherwise matches files named like the binary).
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = IsServerFlagFile;
  usage_config.contains_helpshort_flags = IsServerFlagFile;
  absl::SetFlagsUsageConfig(usage_config);
}

std::vector<std::string> ParseServerFlags(int argc, char** argv) {
  std::vector<std::string> args = ArgsWithEnvironment(argc, argv);
  std::vector<char*> arg_ptrs;
  for (std::string& a : args) arg_ptrs.push_back(a.data());
  const std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(arg_ptrs.size()), arg_ptrs.data());
  return std::vector<std::string>(positional.begin(), positional.end());
}

absl::StatusOr<LoggingOptions> LoggingOptionsFromFlags() {
  LoggingOptions options;
  const std::string format = absl::GetFlag(FLAGS_log_format);
  if (format != "text" && format != "json") {
    return absl::InvalidArgumentError(
        absl::StrCat("--log_format must be text or json, got '", format, "'"));
  }
  options.json = format == "json";
  const std::string level = absl::GetFlag(FLAGS_log_level);
  options.level = spdlog::level::from_str(level);
  if (options.level == spdlog::level::off && level != "off") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--log_level must be trace, debug, info, warn, error or off, got '", level, "'"));
  }
  return options;
}

absl::StatusOr<DmdServer::Options> OptionsFromFlags(std::vector<std::string>* warnings) {
  DmdServer::Options options;
  options.listen_host = absl::GetFlag(FLAGS_listen_host);
  options.port = absl::GetFlag(FLAGS_port);
  options.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  if (absl::Status s = HttpOptionsFromFlags(options); !s.ok()) return s;
  options.reflection = absl::GetFlag(FLAGS_reflection);
  options.api_keys_file = absl::GetFlag(FLAGS_api_keys_file);
  options.tls.cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  options.tls.key_file = absl::GetFlag(FLAGS_tls_key_file);
  options.tls.client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  options.tls.refresh_s = absl::GetFlag(FLAGS_tls_refresh_s);
  if (absl::Status s = ValidateTls(options.tls); !s.ok()) return s;
  options.max_receive_message_bytes = absl::GetFlag(FLAGS_max_receive_message_bytes);
  options.max_send_message_bytes = absl::GetFlag(FLAGS_max_send_message_bytes);
  options.drain_grace = absl::Seconds(absl::GetFlag(FLAGS_drain_grace_s));
  options.limits.max_prompt_bytes = absl::GetFlag(FLAGS_max_prompt_bytes);
  if (absl::GetFlag(FLAGS_max_images_per_request) > 0) {
    options.limits.max_images_per_request = absl::GetFlag(FLAGS_max_images_per_request);
  }
  absl::StatusOr<Engine::Options> engine = EngineOptionsFromFlags(*warnings);
  if (!engine.ok()) return engine.status();
  options.engine = *std::move(engine);
  return options;
}

}  // namespace dmdserve
