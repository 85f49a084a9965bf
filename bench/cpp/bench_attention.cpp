// CPU paged attention, decode: batch 32, 32 query heads over 8 kv heads,
// head_dim 128, block 16, blocks scattered over the pool. Decode has to read
// the whole KV cache of the batch, so the baseline is the cheapest possible
// read of the same blocks (an XOR over their words): speed_vs_baseline is the
// fraction of that bandwidth the kernel reaches.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>

#include "bench_common.h"
#include "paged_attention.h"

namespace kevlarflow::bench {
namespace {

constexpr int64_t kBatch = 32, kHeads = 32, kKvHeads = 8, kHeadDim = 128, kBlockSize = 16;
constexpr int64_t kBlockNumel = kBlockSize * kKvHeads * kHeadDim;

template <typename T> constexpr DType kDType = DType::kFloat32;
template <> constexpr DType kDType<bf16> = DType::kBFloat16;

template <typename T>
struct DecodeBatch {
  int64_t context;
  std::vector<T> query, out, key_cache, value_cache;
  std::vector<int32_t> block_tables, seq_lens, query_start_loc;
  PagedAttentionArgs args;

  explicit DecodeBatch(int64_t context_len) : context(context_len) {
    const int64_t blocks_per_seq = (context + kBlockSize - 1) / kBlockSize;
    const int64_t num_blocks = kBatch * blocks_per_seq + 16;
    query.resize(kBatch * kHeads * kHeadDim);
    out.resize(query.size());
    key_cache.resize(num_blocks * kBlockNumel);
    value_cache.resize(key_cache.size());
    fill_uniform(query, 1);
    fill_uniform(key_cache, 2);
    fill_uniform(value_cache, 3);
    // As in a long-running server, a sequence's blocks are anywhere in the pool.
    std::vector<int32_t> ids(num_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(0));
    block_tables.assign(ids.begin(), ids.begin() + kBatch * blocks_per_seq);
    seq_lens.assign(kBatch, int32_t(context));
    query_start_loc.resize(kBatch + 1);
    std::iota(query_start_loc.begin(), query_start_loc.end(), 0);  // one token each

    args.out = out.data();
    args.query = query.data();
    args.key_cache = key_cache.data();
    args.value_cache = value_cache.data();
    args.block_tables = block_tables.data();
    args.seq_lens = seq_lens.data();
    args.query_start_loc = query_start_loc.data();
    args.num_seqs = args.num_tokens = kBatch;
    args.num_heads = kHeads;
    args.num_kv_heads = kKvHeads;
    args.head_dim = kHeadDim;
    args.block_size = kBlockSize;
    args.num_blocks = num_blocks;
    args.max_blocks_per_seq = blocks_per_seq;
    args.max_query_len = 1;
    args.scale = 1.f / std::sqrt(float(kHeadDim));
    args.dtype = kDType<T>;
  }

  int64_t kv_bytes() const { return 2 * kBatch * context * kKvHeads * kHeadDim * int64_t(sizeof(T)); }
};

uint64_t xor_words(const char* data, int64_t bytes) {
  uint64_t acc = 0;
  for (int64_t i = 0; i < bytes; i += 8) {
    uint64_t word;
    std::memcpy(&word, data + i, 8);
    acc ^= word;
  }
  return acc;
}

// Every K and V block of the batch read once, in block-table order.
template <typename T>
uint64_t read_kv_once(const DecodeBatch<T>& batch, const ParallelFor& parallel_for) {
  constexpr int64_t block_bytes = kBlockNumel * sizeof(T);
  const auto* keys = reinterpret_cast<const char*>(batch.key_cache.data());
  const auto* values = reinterpret_cast<const char*>(batch.value_cache.data());
  std::atomic<uint64_t> sink{0};
  parallel_for(int64_t(batch.block_tables.size()), 4, [&](int64_t begin, int64_t end) {
    uint64_t acc = 0;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t offset = batch.block_tables[i] * block_bytes;
      acc ^= xor_words(keys + offset, block_bytes) ^ xor_words(values + offset, block_bytes);
    }
    sink ^= acc;
  });
  return sink;
}

template <typename T>
void BM_AttentionDecode(benchmark::State& state, const std::string& key, int64_t context) {
  auto& batch = cached_inputs<DecodeBatch<T>>(key, context);
  const ParallelFor parallel_for = thread_parallel_for;
  time_against_baseline(
      state, [&] { paged_attention_cpu(batch.args, parallel_for); },
      [&] { benchmark::DoNotOptimize(read_kv_once(batch, parallel_for)); });
  state.SetBytesProcessed(state.iterations() * batch.kv_bytes());
  state.SetItemsProcessed(state.iterations() * kBatch);  // decoded tokens
  state.SetLabel("vs reading the KV once");
}

template <typename T>
void register_decode(const char* dtype) {
  for (int64_t context : {1024, 4096}) {
    const std::string name =
        std::string("attention_decode/") + dtype + "/ctx:" + std::to_string(context);
    against_baseline(
        benchmark::RegisterBenchmark(name.c_str(), BM_AttentionDecode<T>, name, context));
  }
}

const bool registered = [] {
  register_decode<float>("fp32");
  register_decode<bf16>("bf16");
  return true;
}();

}  // namespace
}  // namespace kevlarflow::bench
