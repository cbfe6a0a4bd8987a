// dmdserve: gRPC server for one-step text-to-image models. Parses flags into Options
// (server/server_flags.h), wires the server, waits for SIGTERM/SIGINT, drains and exits 0 (a
// signal during start-up exits at once, before serving). Startup errors are fatal (exit 1) with a
// clear message. If gRPC's listener stops accepting connections (server/grpc_log.h), the server
// drains as on SIGTERM and exits 1, for a supervisor to restart it. Every flag can also be set by
// an environment variable DMDSERVE_<FLAG_IN_CAPS>; a flag given on the command line wins.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/strings/str_cat.h"
#include "server/fd_limit.h"
#include "server/grpc_log.h"
#include "server/json_log_formatter.h"
#include "server/server.h"
#include "server/server_flags.h"
#include "spdlog/formatter.h"
#include "spdlog/spdlog.h"
#include "worker/build_info.h"

#ifndef DMDSERVE_VERSION
#define DMDSERVE_VERSION "dev"
#endif

namespace {

[[noreturn]] void Fatal(const std::string& message) {
  spdlog::critical("{}", message);
  spdlog::shutdown();
  std::exit(1);
}

// Set when gRPC's listener has stopped accepting: the exit status is then 1.
std::atomic<bool> listener_failed{false};

void ConfigureLogging() {
  const absl::StatusOr<dmdserve::LoggingOptions> logging = dmdserve::LoggingOptionsFromFlags();
  if (!logging.ok()) Fatal(std::string(logging.status().message()));
  if (logging->json) {
    spdlog::set_formatter(dmdserve::MakeJsonLogFormatter());
  } else {
    spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%L%$ %t %v");
  }
  spdlog::set_level(logging->level);
  spdlog::flush_on(spdlog::level::info);
  dmdserve::RouteGrpcLogsToSpdlog([](const std::string& reason) {
    listener_failed = true;
    spdlog::critical(
        "the gRPC listener stopped accepting connections ({}); draining and exiting with status "
        "1 for a restart",
        reason);
    kill(getpid(), SIGTERM);  // wakes the sigwait in WaitForStopThenDrain
  });
}

// Blocks `signals` in this thread and every thread it starts later; one thread then waits for
// them with sigwait. Returns the set.
sigset_t BlockSignals(std::initializer_list<int> signals) {
  sigset_t set;
  sigemptyset(&set);
  for (const int signal_number : signals) sigaddset(&set, signal_number);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

// The server SIGHUP reloads, while it is serving (null before and once draining starts).
absl::Mutex reload_mu;
dmdserve::DmdServer* reloadable ABSL_GUARDED_BY(reload_mu) = nullptr;

// Reloads the API keys on every SIGHUP, for the life of the process.
void ReloadOnHangup(const sigset_t& hangup) {
  std::thread([hangup] {
    while (true) {
      int signal_number = 0;
      sigwait(&hangup, &signal_number);
      absl::MutexLock lock(&reload_mu);
      if (reloadable == nullptr) continue;
      absl::StatusOr<int> keys = reloadable->ReloadApiKeys();
      if (keys.ok()) {
        spdlog::info("SIGHUP: reloaded {} API key(s)", *keys);
      } else {
        spdlog::warn("SIGHUP: API keys not reloaded: {}", std::string(keys.status().message()));
      }
    }
  }).detach();
}

// Options from the flags, then a started (warming up, then serving) server; fatal on any error.
std::unique_ptr<dmdserve::DmdServer> StartServer() {
  std::vector<std::string> warnings;
  absl::StatusOr<dmdserve::DmdServer::Options> options = dmdserve::OptionsFromFlags(&warnings);
  if (!options.ok()) Fatal(std::string(options.status().message()));
  for (const std::string& warning : warnings) spdlog::warn("{}", warning);
  options->version =
      absl::StrCat(DMDSERVE_VERSION, " (libtorch ", dmdserve::LibtorchVersion(), ")");
  spdlog::info("dmdserve {} starting", options->version);
  if (absl::StatusOr<dmdserve::FdLimits> fds = dmdserve::RaiseFdLimit(); !fds.ok()) {
    spdlog::warn("open-file limit unchanged: {}", std::string(fds.status().message()));
  } else if (fds->soft != fds->soft_before) {
    spdlog::info("open-file limit raised from {} to {} (hard limit {})", fds->soft_before,
                 fds->soft, fds->hard);
  }
  absl::StatusOr<std::unique_ptr<dmdserve::DmdServer>> server =
      dmdserve::DmdServer::Create(*std::move(options));
  if (!server.ok()) Fatal(absl::StrCat("startup failed: ", server.status().ToString()));
  // Machine-readable line for scripts and tests that start the server on port 0.
  const int http_port = (*server)->http_port();
  spdlog::info("serving port={} metrics_port={} http_port={}", (*server)->port(),
               (*server)->metrics_port(), http_port < 0 ? "off" : std::to_string(http_port));
  return *std::move(server);
}

// SIGTERM and SIGINT, waited for on one thread for the life of the process. While the server
// starts (model loading, warm-up: every request is refused with UNAVAILABLE, so none is accepted)
// the first signal exits at once, with status 0. Once serving, the first signal makes
// WaitForStop() return so that main drains; a second one, during the drain, exits at once with
// status 1 (the way out if a batch hangs). Thread-safe.
class StopSignals {
 public:
  explicit StopSignals(const sigset_t& signals) {
    std::thread([this, signals] {
      while (true) {
        int signal_number = 0;
        sigwait(&signals, &signal_number);
        OnSignal(signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
      }
    }).detach();
  }

  // From now on a signal starts a drain instead of exiting.
  void SetServing() {
    absl::MutexLock lock(&mu_);
    phase_ = Phase::kServing;
  }

  // Blocks until the first signal once serving.
  void WaitForStop() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](Phase* phase) { return *phase == Phase::kDraining; }, &phase_));
  }

 private:
  enum class Phase { kStarting, kServing, kDraining };

  void OnSignal(const char* name) {
    absl::MutexLock lock(&mu_);
    switch (phase_) {
      case Phase::kStarting:
        spdlog::info("received {} while starting: exiting before serving (none was accepted)",
                     name);
        spdlog::default_logger()->flush();  // not shutdown(): main may be logging meanwhile
        std::_Exit(listener_failed ? 1 : 0);
      case Phase::kServing:
        spdlog::info("received {}, shutting down (a second signal exits at once)", name);
        phase_ = Phase::kDraining;
        return;
      case Phase::kDraining:
        spdlog::critical("second signal during drain: exiting without finishing accepted requests");
        spdlog::default_logger()->flush();
        std::_Exit(1);
    }
  }

  absl::Mutex mu_;
  Phase phase_ ABSL_GUARDED_BY(mu_) = Phase::kStarting;
};

// Waits for the first stop signal once serving, then drains and stops the server.
void WaitForStopThenDrain(StopSignals& stop, std::unique_ptr<dmdserve::DmdServer> server) {
  stop.WaitForStop();
  {
    absl::MutexLock lock(&reload_mu);
    reloadable = nullptr;
  }
  server->Shutdown();
  server.reset();
}

}  // namespace

int main(int argc, char** argv) {
  dmdserve::SetServerFlagsUsage();
  const std::vector<std::string> positional = dmdserve::ParseServerFlags(argc, argv);
  ConfigureLogging();
  if (positional.size() > 1) Fatal(absl::StrCat("unexpected argument '", positional[1], "'"));
  // Every signal is blocked before the first thread starts: a thread inherits its creator's mask,
  // and a thread that left SIGHUP unblocked would take its default action (exit).
  const sigset_t stop_signals = BlockSignals({SIGTERM, SIGINT});
  const sigset_t hangup = BlockSignals({SIGHUP});
  static StopSignals* const stop = new StopSignals(stop_signals);
  ReloadOnHangup(hangup);
  std::unique_ptr<dmdserve::DmdServer> server = StartServer();
  {
    absl::MutexLock lock(&reload_mu);
    reloadable = server.get();
  }
  stop->SetServing();
  WaitForStopThenDrain(*stop, std::move(server));
  spdlog::shutdown();
  return listener_failed ? 1 : 0;
}
