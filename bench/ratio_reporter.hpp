// SPDX-License-Identifier: Apache-2.0
//! @file
//! Benchmarks report ratios against a baseline measured in the same run (machines are shared and
//! noisy, absolute numbers drift between runs). `ratio_reporter` prints the usual console table,
//! remembers every run, and at the end prints one line per declared (numerator, baseline) pair:
//!
//!   ratio = throughput(numerator) / throughput(baseline)     (> 1: the numerator is faster)
//!
//! where throughput is bytes/s when both runs set it (shown in GiB/s, Google Benchmark's "G/s"),
//! else 1 / (real time per iteration). With --benchmark_repetitions the median aggregate is used.
//!
//! Optionally a `paired` counter: a benchmark that measured itself step by step alongside a common
//! reference (so both saw the same machine state) stores its throughput relative to that
//! reference in the counter; the pair's "paired" ratio is then counter(num) / counter(base),
//! which cancels the drift between the two runs.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace kvcache_bench {

struct ratio_pair {
  std::string numerator;
  std::string baseline;
};

class ratio_reporter : public benchmark::ConsoleReporter {
 public:
  explicit ratio_reporter(std::vector<ratio_pair> pairs, std::string paired = {})
      : pairs_(std::move(pairs)), paired_(std::move(paired)) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      if (r.error_occurred) continue;
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name != "median") continue;
      entry e;
      e.seconds = r.GetAdjustedRealTime() * to_seconds(r.time_unit);
      if (auto it = r.counters.find("bytes_per_second"); it != r.counters.end())
        e.bytes_per_second = it->second.value;
      if (auto it = r.counters.find(paired_); !paired_.empty() && it != r.counters.end())
        e.paired = it->second.value;
      std::string name = r.run_name.str();  // pairs name runs without the timing suffix
      for (const char* suffix : {"/manual_time", "/real_time"})
        if (auto at = name.rfind(suffix);
            at != std::string::npos && at + std::strlen(suffix) == name.size())
          name.erase(at);
      seen_[name] = e;  // the median aggregate (reported after the runs) wins
    }
    ConsoleReporter::ReportRuns(runs);
  }

  void Finalize() override {
    auto& os = GetOutputStream();
    if (!pairs_.empty()) {
      os << "\nRatios: throughput(numerator) / throughput(baseline), > 1: numerator faster";
      if (!paired_.empty()) os << "; paired: the same through '" << paired_ << "'";
      os << "\n";
      char line[512];
      std::snprintf(line, sizeof line, "%-40s %-34s %7s %7s %24s %24s\n", "numerator", "baseline",
                    "ratio", paired_.empty() ? "" : "paired", "numerator", "baseline");
      os << line;
      for (const auto& p : pairs_) {
        const auto n = seen_.find(p.numerator), b = seen_.find(p.baseline);
        if (n == seen_.end() || b == seen_.end()) continue;  // filtered out or failed
        const entry &ne = n->second, &be = b->second;
        const bool bytes = ne.bytes_per_second > 0 && be.bytes_per_second > 0;
        const double ratio =
            bytes ? ne.bytes_per_second / be.bytes_per_second : be.seconds / ne.seconds;
        char paired[16] = "";
        if (ne.paired > 0 && be.paired > 0)
          std::snprintf(paired, sizeof paired, "%.3f", ne.paired / be.paired);
        std::snprintf(line, sizeof line, "%-40s %-34s %7.3f %7s %24s %24s\n",
                      p.numerator.c_str(), p.baseline.c_str(), ratio, paired,
                      human(ne, bytes).c_str(), human(be, bytes).c_str());
        os << line;
      }
    }
    ConsoleReporter::Finalize();
  }

 private:
  struct entry {
    double seconds = 0;
    double bytes_per_second = 0;
    double paired = 0;
  };
  static double to_seconds(benchmark::TimeUnit u) {
    switch (u) {
      case benchmark::kNanosecond: return 1e-9;
      case benchmark::kMicrosecond: return 1e-6;
      case benchmark::kMillisecond: return 1e-3;
      default: return 1.0;
    }
  }
  //! Time per iteration, and bytes/s where the ratio uses it.
  static std::string human(const entry& e, bool bytes) {
    char s[48];
    const double t = e.seconds;
    const int n = t < 1e-6   ? std::snprintf(s, sizeof s, "%.1f ns", t * 1e9)
                  : t < 1e-3 ? std::snprintf(s, sizeof s, "%.2f us", t * 1e6)
                             : std::snprintf(s, sizeof s, "%.2f ms", t * 1e3);
    if (bytes)
      std::snprintf(s + n, sizeof s - n, " %.2f GiB/s",
                    e.bytes_per_second / (1024.0 * 1024 * 1024));
    return s;
  }

  std::vector<ratio_pair> pairs_;
  std::string paired_;
  std::map<std::string, entry> seen_;
};

//! main() body: runs what is registered, then prints the ratios. `--benchmark_min_time`
//! defaults to 0.2 s (pass it to override). `paired`: see ratio_reporter.
inline int run_with_ratios(int argc, char** argv, std::vector<ratio_pair> pairs,
                           std::string paired = {}) {
  std::vector<char*> args(argv, argv + argc);
  static char min_time[] = "--benchmark_min_time=0.2";
  bool has_min_time = false;
  for (char* a : args) has_min_time |= std::string(a).rfind("--benchmark_min_time", 0) == 0;
  if (!has_min_time) args.insert(args.begin() + 1, min_time);
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  ratio_reporter reporter(std::move(pairs), std::move(paired));
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}

}  // namespace kvcache_bench
