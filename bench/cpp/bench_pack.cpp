// Packing KV blocks for replication and recovery: gather ids from each of 64
// caches (32 layers x K, V) of [512 blocks, 16, 8, 128] bf16 into one staging
// buffer, and scatter it back. Baseline: memcpy of the same bytes from (or to)
// one contiguous buffer, over the same threads; speed_vs_baseline near 1 means
// the scattered blocks cost nothing extra. Once a thread's share passes glibc's
// non-temporal threshold (glibc.cpu.x86_non_temporal_threshold, a fraction of
// the L3), the baseline's one big memcpy streams past the cache, which the
// kernel's 32 KiB copies never do: expect the ratio to drop there.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>

#include "bench_common.h"
#include "cache_ops.h"

namespace kevlarflow::bench {
namespace {

constexpr int64_t kCaches = 64, kPoolBlocks = 512;
constexpr int64_t kBlockBytes = 16 * 8 * 128 * sizeof(bf16);

struct PackInputs {
  // Contents do not change a copy's speed, but every page must be written
  // before timing starts, and a zero fill may become calloc, which is not.
  std::vector<std::vector<char>> caches;
  std::vector<void*> cache_ptrs;
  std::vector<int64_t> ids;  // distinct blocks scattered over the pool
  std::vector<char> staging, contiguous;  // contiguous: the baseline's far end

  explicit PackInputs(int64_t num_ids)
      : caches(kCaches, std::vector<char>(kPoolBlocks * kBlockBytes, 1)) {
    for (auto& cache : caches) cache_ptrs.push_back(cache.data());
    ids.resize(kPoolBlocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(0));
    ids.resize(num_ids);
    staging.assign(num_ids * kCaches * kBlockBytes, 2);
    contiguous.assign(staging.size(), 3);
  }

  BlockCaches block_caches() const { return {cache_ptrs.data(), kCaches, kBlockBytes}; }
};

// The same bytes over the same thread ranges as the kernels (pieces of one
// block of one cache, grain 4), but one memcpy per range: the fastest copy.
void copy_contiguous(char* dst, const char* src, int64_t pieces, const ParallelFor& parallel_for) {
  parallel_for(pieces, 4, [&](int64_t begin, int64_t end) {
    std::memcpy(dst + begin * kBlockBytes, src + begin * kBlockBytes, (end - begin) * kBlockBytes);
  });
}

void BM_Pack(benchmark::State& state, bool pack) {
  const int64_t num_ids = state.range(0);
  auto& in = cached_inputs<PackInputs>("pack/blocks:" + std::to_string(num_ids), num_ids);
  const ParallelFor parallel_for = thread_parallel_for;
  const BlockCaches caches = in.block_caches();
  char* staging = in.staging.data();
  char* contiguous = in.contiguous.data();
  const int64_t pieces = num_ids * kCaches;
  if (pack) {
    time_against_baseline(
        state, [&] { pack_blocks_cpu(caches, in.ids.data(), num_ids, staging, parallel_for); },
        [&] { copy_contiguous(staging, contiguous, pieces, parallel_for); });
  } else {
    time_against_baseline(
        state, [&] { unpack_blocks_cpu(caches, in.ids.data(), num_ids, staging, parallel_for); },
        [&] { copy_contiguous(contiguous, staging, pieces, parallel_for); });
  }
  state.SetBytesProcessed(state.iterations() * pieces * kBlockBytes);
  state.SetLabel("vs contiguous memcpy");
}

// Pack and unpack of one size side by side: they share their inputs.
const bool registered = [] {
  for (int64_t num_ids : {16, 64, 256}) {
    for (bool pack : {true, false}) {
      against_baseline(
          benchmark::RegisterBenchmark(pack ? "pack_blocks" : "unpack_blocks", BM_Pack, pack))
          ->ArgName("blocks")
          ->Arg(num_ids);
    }
  }
  return true;
}();

}  // namespace
}  // namespace kevlarflow::bench
