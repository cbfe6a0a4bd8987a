#include "client/bench.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <random>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "client/output.h"

namespace dmdserve::client {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

// Records of a running benchmark, shared by the request threads and the progress thread.
class Recorder {
 public:
  void Add(const RequestRecord& record, const absl::Status& status) {
    absl::MutexLock lock(&mu_);
    records_.push_back(record);
    if (!status.ok()) {
      first_errors_.emplace(absl::StatusCodeToString(status.code()), std::string(status.message()));
    }
  }
  std::vector<RequestRecord> records() const {
    absl::MutexLock lock(&mu_);
    return records_;
  }
  // Status code name -> message of the first request that failed with it.
  std::map<std::string, std::string> first_errors() const {
    absl::MutexLock lock(&mu_);
    return first_errors_;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<RequestRecord> records_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> first_errors_ ABSL_GUARDED_BY(mu_);
};

uint64_t RandomSeed() {
  std::random_device device;
  return uint64_t{device()} << 32 | device();
}

}  // namespace

double Percentile(const std::vector<double>& sorted, double p) {
  const size_t n = sorted.size();
  // p * n first: exact for whole numbers, so that e.g. p99 of 100 values is rank 99, not 100.
  const double rank = std::ceil(p * static_cast<double>(n) / 100.0);
  const size_t index = rank < 1 ? 0 : std::min(n, static_cast<size_t>(rank)) - 1;
  return sorted[index];
}

BenchSummary Summarize(const std::vector<RequestRecord>& records, int concurrency,
                       double elapsed_seconds) {
  BenchSummary summary;
  summary.concurrency = concurrency;
  summary.elapsed_seconds = elapsed_seconds;
  std::vector<double> latencies;
  for (const RequestRecord& record : records) {
    ++summary.requests;
    ++summary.status_codes[absl::StatusCodeToString(record.code)];
    if (record.code != absl::StatusCode::kOk) continue;
    ++summary.ok;
    summary.images += record.images;
    latencies.push_back(record.latency_seconds);
  }
  if (elapsed_seconds > 0) {
    summary.images_per_second = static_cast<double>(summary.images) / elapsed_seconds;
    summary.requests_per_second = static_cast<double>(summary.ok) / elapsed_seconds;
  }
  if (!latencies.empty()) {
    std::sort(latencies.begin(), latencies.end());
    LatencySummary latency;
    latency.p50 = Percentile(latencies, 50);
    latency.p90 = Percentile(latencies, 90);
    latency.p99 = Percentile(latencies, 99);
    latency.max = latencies.back();
    double sum = 0;
    for (double l : latencies) sum += l;
    latency.mean = sum / static_cast<double>(latencies.size());
    summary.latency = latency;
  }
  return summary;
}

nlohmann::ordered_json BenchJson(const BenchSummary& summary) {
  nlohmann::ordered_json latency = nullptr;
  if (summary.latency.has_value()) {
    latency = {{"p50", summary.latency->p50},
               {"p90", summary.latency->p90},
               {"p99", summary.latency->p99},
               {"max", summary.latency->max},
               {"mean", summary.latency->mean}};
  }
  nlohmann::ordered_json codes = nlohmann::ordered_json::object();
  for (const auto& [code, count] : summary.status_codes) codes[code] = count;
  return {{"concurrency", summary.concurrency},
          {"requests", summary.requests},
          {"ok", summary.ok},
          {"failed", summary.requests - summary.ok},
          {"images", summary.images},
          {"elapsed_seconds", summary.elapsed_seconds},
          {"images_per_second", summary.images_per_second},
          {"requests_per_second", summary.requests_per_second},
          {"latency_seconds", std::move(latency)},
          {"status_codes", std::move(codes)}};
}

std::string BenchText(const BenchSummary& summary) {
  std::string text = absl::StrFormat(
      "requests: %d (%d OK, %d failed) in %.2f s at concurrency %d\n"
      "throughput: %.2f images/s, %.2f requests/s (successful requests)\n",
      summary.requests, summary.ok, summary.requests - summary.ok, summary.elapsed_seconds,
      summary.concurrency, summary.images_per_second, summary.requests_per_second);
  if (summary.latency.has_value()) {
    const LatencySummary& l = *summary.latency;
    absl::StrAppendFormat(&text,
                          "latency (s, successful requests): p50 %.3f  p90 %.3f  p99 %.3f  "
                          "max %.3f  mean %.3f\n",
                          l.p50, l.p90, l.p99, l.max, l.mean);
  } else {
    text += "latency: no successful request\n";
  }
  std::vector<std::string> codes;
  for (const auto& [code, count] : summary.status_codes)
    codes.push_back(absl::StrCat(code, " ", count));
  absl::StrAppend(&text, "status codes: ", absl::StrJoin(codes, ", "), "\n");
  return text;
}

std::string ProgressBar(double fraction, int width, const std::string& label) {
  const double clamped = std::clamp(fraction, 0.0, 1.0);
  const int filled = static_cast<int>(clamped * width);
  return absl::StrCat("[", std::string(filled, '#'), std::string(width - filled, '.'), "] ", label);
}

int RunBench(const DmdClient& client, const BenchOptions& options, std::ostream& out,
             std::ostream& err) {
  const uint64_t base_seed = options.request.has_seed() ? options.request.seed() : RandomSeed();
  const uint64_t images_per_request = std::max(options.request.num_images(), 1);
  const Clock::time_point start = Clock::now();
  const Clock::time_point end = start + absl::ToChronoNanoseconds(options.duration);

  Recorder recorder;
  std::atomic<int64_t> next{0};
  auto send_requests = [&] {
    for (;;) {
      const int64_t n = next.fetch_add(1);
      if (options.count > 0 ? n >= options.count : Clock::now() >= end) return;
      v1::GenerateRequest request = options.request;
      request.set_prompt(options.prompts[n % options.prompts.size()]);
      request.set_seed(base_seed + static_cast<uint64_t>(n) * images_per_request);
      request.set_request_id(absl::StrCat("bench-", n));
      const Clock::time_point sent = Clock::now();
      absl::StatusOr<v1::GenerateResponse> response = client.Generate(request);
      RequestRecord record;
      record.code = response.status().code();
      record.latency_seconds = SecondsBetween(sent, Clock::now());
      record.images = response.ok() ? response->images_size() : 0;
      recorder.Add(record, response.status());
    }
  };

  absl::Notification done;
  std::thread progress;
  if (options.progress) {
    progress = std::thread([&] {
      for (bool finished = false; !finished;) {
        finished = done.WaitForNotificationWithTimeout(absl::Milliseconds(250));
        const double elapsed = SecondsBetween(start, Clock::now());
        const BenchSummary now = Summarize(recorder.records(), options.concurrency, elapsed);
        const double fraction = options.count > 0
                                    ? static_cast<double>(now.requests) / options.count
                                    : elapsed / absl::ToDoubleSeconds(options.duration);
        const std::string label =
            absl::StrFormat("%d requests, %.1f images/s, %d failed", now.requests,
                            now.images_per_second, now.requests - now.ok);
        err << "\r" << ProgressBar(fraction, 30, label) << std::flush;
      }
      err << "\n";
    });
  }
  std::vector<std::thread> senders;
  for (int i = 0; i < options.concurrency; ++i) senders.emplace_back(send_requests);
  for (std::thread& sender : senders) sender.join();
  const double elapsed_seconds = SecondsBetween(start, Clock::now());
  done.Notify();
  if (progress.joinable()) progress.join();

  const BenchSummary summary = Summarize(recorder.records(), options.concurrency, elapsed_seconds);
  for (const auto& [code, message] : recorder.first_errors()) {
    err << "error: " << code << ": " << message << " [" << summary.status_codes.at(code)
        << " requests]\n";
  }
  out << (options.json ? DumpJson(BenchJson(summary)) + "\n" : BenchText(summary));
  return summary.ok == summary.requests ? 0 : 1;
}

}  // namespace dmdserve::client
