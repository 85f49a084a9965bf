// Runs every benchmark as 5 repetitions and prints one line each: the median
// with its min-max spread, for the time, the bandwidth and the speed against
// the baseline timed alongside. Flags given on the command line win over these
// defaults; --benchmark_format=json (or --benchmark_out=FILE) gives raw data.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "bench_common.h"

namespace kevlarflow::bench {

int& num_threads() {
  static int threads = 1;
  return threads;
}

namespace {

using Run = benchmark::BenchmarkReporter::Run;

struct Stat {
  double median = 0, min = 0, max = 0;
};

class MedianSpreadReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    // With repetitions: the median/min/max aggregates. With one: that run.
    std::map<std::string, const Run*> by_stat;
    for (const Run& run : runs)
      by_stat[run.run_type == Run::RT_Aggregate ? run.aggregate_name : "median"] = &run;
    auto pick = [&](const char* stat, const Run* otherwise) {
      auto it = by_stat.find(stat);
      return it == by_stat.end() ? otherwise : it->second;
    };
    const Run* median = pick("median", nullptr);
    if (!median) return;
    const Run* low = pick("min", median);
    const Run* high = pick("max", median);
    auto& out = GetOutputStream();
    if (!printed_header_) {
      out << format("%-30s %10s %22s %24s  %s\n", "benchmark", "ms", "GB/s", "speed vs baseline",
                    "baseline");
      out << format("%-30s %10s %22s %24s\n", "", "median", "median (min-max)",
                    "median (min-max)");
      printed_header_ = true;
    }
    if (median->error_occurred) {
      out << format("%-30s error: %s\n", name(*median).c_str(),
                    median->error_message.c_str());
      return;
    }
    const Stat gbps = counter(*median, *low, *high, "bytes_per_second", 1e-9);
    const Stat ratio = counter(*median, *low, *high, "speed_vs_baseline", 1);
    out << format("%-30s %10.2f %8.2f (%5.2f-%5.2f) %10.2fx (%4.2f-%4.2f)  %s\n",
                  name(*median).c_str(), ms(*median), gbps.median, gbps.min, gbps.max,
                  ratio.median, ratio.min, ratio.max, median->report_label.c_str());
  }

 private:
  // Every benchmark here uses manual time: the suffix says nothing.
  static std::string name(const Run& run) {
    std::string n = run.run_name.str();
    const std::string suffix = "/manual_time";
    if (n.size() > suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0)
      n.resize(n.size() - suffix.size());
    return n;
  }

  static double ms(const Run& run) {
    return run.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(run.time_unit) * 1e3;
  }

  static Stat counter(const Run& median, const Run& low, const Run& high, const char* name,
                      double unit) {
    auto value = [&](const Run& run) {
      auto it = run.counters.find(name);
      return it == run.counters.end() ? 0.0 : double(it->second) * unit;
    };
    return {value(median), value(low), value(high)};
  }

  template <typename... Args>
  static std::string format(const char* fmt, Args... args) {
    char line[512];
    std::snprintf(line, sizeof line, fmt, args...);
    return line;
  }
};

bool has_flag(const std::vector<char*>& args, const char* flag) {
  return std::any_of(args.begin(), args.end(),
                     [&](const char* a) { return std::strncmp(a, flag, std::strlen(flag)) == 0; });
}

}  // namespace
}  // namespace kevlarflow::bench

int main(int argc, char** argv) {
  using namespace kevlarflow::bench;
  std::vector<char*> args(argv, argv + argc);
  // Google Benchmark 1.7 syntax: min_time is a bare number of seconds.
  static char repetitions[] = "--benchmark_repetitions=5";
  static char min_time[] = "--benchmark_min_time=0.5";
  static char aggregates_only[] = "--benchmark_report_aggregates_only=true";
  if (!has_flag(args, "--benchmark_repetitions")) args.push_back(repetitions);
  if (!has_flag(args, "--benchmark_min_time")) args.push_back(min_time);
  if (!has_flag(args, "--benchmark_report_aggregates_only")) args.push_back(aggregates_only);
  const bool own_format = !has_flag(args, "--benchmark_format");
  int count = int(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;

  const char* env = std::getenv("KEVLARFLOW_BENCH_THREADS");
  num_threads() = env ? std::max(1, std::atoi(env))
                      : std::max(1, int(std::thread::hardware_concurrency()));
  benchmark::AddCustomContext("kernel threads", std::to_string(num_threads()) +
                                                    " (KEVLARFLOW_BENCH_THREADS)");

  MedianSpreadReporter reporter;
  own_format ? benchmark::RunSpecifiedBenchmarks(&reporter) : benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
