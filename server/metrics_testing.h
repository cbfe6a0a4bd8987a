// Test-only reading of a Metrics registry (metrics.h): the value of a metric as a test asserts
// it, without parsing the text exposition.
//
// Thread-safe as Metrics is: a read is one Collect() of the registry.
#ifndef DMDSERVE_SERVER_METRICS_TESTING_H_
#define DMDSERVE_SERVER_METRICS_TESTING_H_

#include <prometheus/metric_family.h>

#include <algorithm>
#include <map>
#include <string>

#include "server/metrics.h"

namespace dmdserve {

// Sum of the samples of metric `family` whose labels include `labels`: a counter's or gauge's
// value, a histogram's sample count.
inline double MetricSum(const Metrics& metrics, const std::string& family,
                        const std::map<std::string, std::string>& labels) {
  double sum = 0;
  for (const prometheus::MetricFamily& f : metrics.registry()->Collect()) {
    if (f.name != family) continue;
    for (const prometheus::ClientMetric& m : f.metric) {
      const bool match = std::all_of(labels.begin(), labels.end(), [&](const auto& want) {
        return std::any_of(m.label.begin(), m.label.end(), [&](const auto& l) {
          return l.name == want.first && l.value == want.second;
        });
      });
      if (!match) continue;
      sum += m.counter.value + m.gauge.value + static_cast<double>(m.histogram.sample_count);
    }
  }
  return sum;
}

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_METRICS_TESTING_H_
