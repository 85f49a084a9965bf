// Helpers shared by the C++ microbenchmarks: a std::thread ParallelFor for the
// kernels, random fills, and timing of a kernel against its baseline.
#pragma once
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dtypes.h"
#include "parallel.h"

namespace kevlarflow::bench {

// Threads the kernels (and their baselines) run on: KEVLARFLOW_BENCH_THREADS,
// else every core. Set once by main before any benchmark runs.
int& num_threads();

// Splits [0, n) into at most num_threads() contiguous ranges, one per thread.
// A fresh thread per range costs tens of microseconds: noise next to the
// milliseconds that every benchmark here takes, and no pool to get wrong.
inline void thread_parallel_for(int64_t n, int64_t grain,
                                const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  const int64_t ranges = std::clamp<int64_t>(n / std::max<int64_t>(grain, 1), 1, num_threads());
  if (ranges == 1) return body(0, n);
  std::vector<std::thread> workers;
  for (int64_t r = 1; r < ranges; ++r)
    workers.emplace_back(body, n * r / ranges, n * (r + 1) / ranges);
  body(0, n / ranges);
  for (auto& w : workers) w.join();
}

// Deterministic values in [-1, 1): splitmix64 is fast enough to fill gigabytes.
template <typename T>
void fill_uniform(std::vector<T>& data, uint64_t seed) {
  for (auto& x : data) {
    uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    x = from_float<T>(float(z >> 40) * 0x1.0p-23f - 1.f);
  }
}

// Inputs are built once per benchmark and kept while it repeats: Google
// Benchmark calls the function many times, and gigabytes take seconds to fill.
// Only the latest inputs are held, so memory holds one benchmark's worth.
struct HeldInputs {
  std::string key;
  std::shared_ptr<void> inputs;
};

inline HeldInputs& held_inputs() {
  static HeldInputs held;  // one for every benchmark and input type
  return held;
}

// key names the inputs uniquely (type and shape): a new key frees the old ones.
template <typename Inputs, typename... Args>
Inputs& cached_inputs(const std::string& key, const Args&... args) {
  HeldInputs& held = held_inputs();
  if (held.key != key) {
    held.inputs.reset();
    held.inputs = std::make_shared<Inputs>(args...);
    held.key = key;
  }
  return *static_cast<Inputs*>(held.inputs.get());
}

// Times ours and baseline back to back in every iteration, alternating which
// goes first, so that noise and cache warmth on a shared machine hit both
// alike. The benchmark's time is ours alone (register with against_baseline);
// counter speed_vs_baseline = baseline time / our time over the repetition.
template <typename Ours, typename Baseline>
void time_against_baseline(benchmark::State& state, Ours&& ours, Baseline&& baseline) {
  using Clock = std::chrono::steady_clock;
  double ours_s = 0, baseline_s = 0;
  bool ours_first = true;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    ours_first ? ours() : baseline();
    const auto t1 = Clock::now();
    ours_first ? baseline() : ours();
    const auto t2 = Clock::now();
    const double first = std::chrono::duration<double>(t1 - t0).count();
    const double second = std::chrono::duration<double>(t2 - t1).count();
    const double mine = ours_first ? first : second;
    ours_s += mine;
    baseline_s += ours_first ? second : first;
    state.SetIterationTime(mine);
    ours_first = !ours_first;
  }
  state.counters["speed_vs_baseline"] = baseline_s / ours_s;
}

// Settings of every benchmark here: its time is ours alone (set by
// time_against_baseline), in ms, and repetitions report min and max besides
// the median.
inline benchmark::internal::Benchmark* against_baseline(benchmark::internal::Benchmark* b) {
  return b->UseManualTime()
      ->Unit(benchmark::kMillisecond)
      ->ComputeStatistics("min", [](const std::vector<double>& v) {
        return *std::min_element(v.begin(), v.end());
      })
      ->ComputeStatistics("max", [](const std::vector<double>& v) {
        return *std::max_element(v.begin(), v.end());
      });
}

}  // namespace kevlarflow::bench
