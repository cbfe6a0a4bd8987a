// `dmdctl bench`: a closed-loop load generator for Generate, and its statistics.
//
// RunBench keeps `concurrency` requests in flight (one thread per in-flight request, each with a
// blocking call on the shared thread-safe DmdClient) until `count` requests were sent or
// `duration` has passed, then reports throughput, latency percentiles and status-code counts.
// The statistics helpers are pure functions.
#ifndef DMDSERVE_CLIENT_BENCH_H_
#define DMDSERVE_CLIENT_BENCH_H_

#include <cstdint>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "client/dmd_client.h"
#include "dmdserve/v1/dmdserve.pb.h"
#include "nlohmann/json.hpp"

namespace dmdserve::client {

struct BenchOptions {
  // Template of every request: model, num_images, width, height, encoding. Request n gets
  // prompt prompts[n % prompts.size()], request_id "bench-<n>" and seed base + n * images per
  // request, where base is request.seed() when set and a random number otherwise.
  v1::GenerateRequest request;
  // Prompts to cycle through; must not be empty.
  std::vector<std::string> prompts;
  // Requests in flight at once; must be >= 1. Default 4.
  int concurrency = 4;
  // Number of requests to send; 0 (default): send requests until `duration` has passed.
  int64_t count = 0;
  // How long to send new requests when count is 0 (requests in flight then finish). Default 10 s.
  absl::Duration duration = absl::Seconds(10);
  // Print one JSON object (BenchJson) instead of text. Default false.
  bool json = false;
  // Draw a progress bar on stderr. Default false.
  bool progress = false;
};

// Outcome of one request.
struct RequestRecord {
  absl::StatusCode code = absl::StatusCode::kOk;
  double latency_seconds = 0;  // from sending the request to receiving its response
  int images = 0;              // images received (0 on failure)
};

struct LatencySummary {
  double p50 = 0, p90 = 0, p99 = 0, max = 0, mean = 0;  // seconds
};

struct BenchSummary {
  int concurrency = 0;
  int64_t requests = 0;  // completed, successful or not
  int64_t ok = 0;
  int64_t images = 0;  // images received by successful requests
  double elapsed_seconds = 0;
  double images_per_second = 0;           // images / elapsed_seconds
  double requests_per_second = 0;         // ok / elapsed_seconds
  std::optional<LatencySummary> latency;  // of successful requests; absent when there are none
  std::map<std::string, int64_t> status_codes;  // "OK", "UNAVAILABLE", ... -> count
};

// Nearest-rank percentile of `sorted` (ascending, non-empty): the smallest value that at least
// p percent of the values are less than or equal to. p in [0, 100]; p = 0 gives the minimum.
double Percentile(const std::vector<double>& sorted, double p);

// Aggregates the records of a run that lasted `elapsed_seconds` (> 0).
BenchSummary Summarize(const std::vector<RequestRecord>& records, int concurrency,
                       double elapsed_seconds);

// {"concurrency", "requests", "ok", "failed", "images", "elapsed_seconds", "images_per_second",
//  "requests_per_second", "latency_seconds": {"p50", "p90", "p99", "max", "mean"} or null,
//  "status_codes": {"OK": n, ...}}
nlohmann::ordered_json BenchJson(const BenchSummary& summary);

// A few human-readable lines.
std::string BenchText(const BenchSummary& summary);

// "[#####.....] " followed by `label`, `width` cells wide; `fraction` is clamped to [0, 1].
std::string ProgressBar(double fraction, int width, const std::string& label);

// Runs the benchmark; `options` must respect the limits documented above (BenchOptionsFromFlags
// checks them). Exit code: 0 when every request succeeded, 1 otherwise (the report is
// printed either way, and the first error message of each failing code on `err`).
int RunBench(const DmdClient& client, const BenchOptions& options, std::ostream& out,
             std::ostream& err);

}  // namespace dmdserve::client

#endif  // DMDSERVE_CLIENT_BENCH_H_
