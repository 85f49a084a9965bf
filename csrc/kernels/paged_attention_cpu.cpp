// CPU paged attention. Work is split into (sequence, query tile, kv head)
// items; one item computes the rows of every query head that shares the kv
// head, so each K/V row is read from memory once per item, not once per head.
//
// Per row the result depends only on that row's query and context: keys are
// visited block by block in ascending order with a fixed reduction order, and
// blocks fully masked for a row leave its state untouched. So a token gets the
// same bits whether it is decoded alone, batched with others, or part of a
// prefill chunk — which recovery relies on when it recomputes lost KV.
//
// This file is compiled once per instruction set (KEVLARFLOW_CPU_ISA names
// the variant); paged_attention_cpu_dispatch.cpp picks one at run time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "paged_attention.h"

#if defined(__FMA__)
#include <immintrin.h>
#endif

#ifndef KEVLARFLOW_CPU_ISA
#define KEVLARFLOW_CPU_ISA generic
#endif
#define KF_CONCAT_(a, b) a##b
#define KF_CONCAT(a, b) KF_CONCAT_(a, b)

namespace kevlarflow {
namespace {

constexpr int64_t kRowsPerTile = 64;  // query rows (token x head) per work item
constexpr int kLanes = 8;             // floats per vector register (two on SSE-only builds)

// GCC/Clang vector extension: the same source becomes AVX2 or SSE code, with a
// fixed order of operations per lane (no reassociation is ever needed).
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// a * b + c. The build turns off implicit contraction (-ffp-contract=off):
// left to itself the compiler fuses some of these and not others, depending on
// the code around them and on its version, and a row's bits would then depend
// on the path that computed it. Here the choice is made once per variant.
inline vfloat madd(vfloat a, vfloat b, vfloat c) {
#if defined(__FMA__)
  static_assert(sizeof(vfloat) == sizeof(__m256));
  return (vfloat)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline vfloat splat(float x) { return vfloat{} + x; }
inline float lane_sum(vfloat v) {
  float sum = 0.f;
  for (int u = 0; u < kLanes; ++u) sum += v[u];
  return sum;
}

typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

// e^x for x <= 0 (a score minus its running maximum), to about 2 ulp; exactly
// 0 below -87 (and for -inf). Elementwise and branch-free, so it vectorizes;
// std::exp is a scalar call that dominated decode at small head sizes.
inline vfloat exp_nonpositive(vfloat x) {
  const vint in_range = x > -87.f;  // all ones where true; false for -inf and NaN
  x = in_range ? x : vfloat{} - 87.f;  // keep the arithmetic finite, zeroed below
  const vfloat t = x * 1.44269504088896341f;               // x / ln 2
  const vint n = __builtin_convertvector(t - 0.5f, vint);  // round to nearest (t <= 0)
  const vfloat nf = __builtin_convertvector(n, vfloat);
  // r = x - n ln 2 in two steps (ln 2 split in a high and a low part), |r| <= ln2 / 2.
  const vfloat r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;
  // Taylor series of e^r to r^7: truncation error below 2^-24 on |r| <= ln2 / 2.
  vfloat p = madd(r, splat(1.f / 5040.f), splat(1.f / 720.f));
  p = madd(p, r, splat(1.f / 120.f));
  p = madd(p, r, splat(1.f / 24.f));
  p = madd(p, r, splat(1.f / 6.f));
  p = madd(p, r, splat(0.5f));
  p = madd(p, r, splat(1.f));
  p = madd(p, r, splat(1.f));
  const vint scale_bits = (n + 127) << 23;  // 2^n
  vfloat scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  vint bits;
  const vfloat result = p * scale;
  std::memcpy(&bits, &result, sizeof(bits));
  bits &= in_range;  // exactly +0 below the range
  vfloat out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float exp_nonpositive(float x) {
  vfloat v = {};
  v[0] = x;
  return exp_nonpositive(v)[0];
}

// head_dim is a multiple of kLanes (checked by the bindings).
inline float dot(const float* a, const float* b, int64_t n) {
  vfloat acc = {};
  for (int64_t d = 0; d < n; d += kLanes) acc = madd(load(a + d), load(b + d), acc);
  return lane_sum(acc);
}

// dot() of four consecutive rows of q (row stride n) with one key, which is
// loaded once. Each row goes through exactly dot()'s operations, so its result
// does not depend on whether it was computed in a group of four or alone.
inline void dot4(const float* q, const float* k, int64_t n, float* out) {
  vfloat acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  for (int64_t d = 0; d < n; d += kLanes) {
    const vfloat key = load(k + d);
    acc0 = madd(load(q + d), key, acc0);
    acc1 = madd(load(q + n + d), key, acc1);
    acc2 = madd(load(q + 2 * n + d), key, acc2);
    acc3 = madd(load(q + 3 * n + d), key, acc3);
  }
  out[0] = lane_sum(acc0), out[1] = lane_sum(acc1), out[2] = lane_sum(acc2), out[3] = lane_sum(acc3);
}

// o += sum_j p[j] * v_j, keeping a vector of o in a register across keys; per
// element of o the additions happen in ascending j.
inline void accumulate_values(const float* p, const float* values, int64_t count, int64_t step,
                              float* o, int64_t n) {
  for (int64_t d = 0; d < n; d += kLanes) {
    vfloat acc = load(o + d);
    for (int64_t j = 0; j < count; ++j) acc = madd(load(values + j * step + d), splat(p[j]), acc);
    store(o + d, acc);
  }
}

inline void scale_row(float alpha, float* y, int64_t n) {
  for (int64_t d = 0; d < n; d += kLanes) store(y + d, load(y + d) * alpha);
}

template <typename T>
void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = to_float(src[d]);
}

// Rows of one kv head's cache block, as float: fp32 caches are read in place,
// 16-bit caches are converted into a scratch buffer first.
template <typename T>
const float* block_rows(const T* cache, int64_t first, int64_t count, int64_t row_stride,
                        int64_t head_dim, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    (void)count; (void)scratch; (void)head_dim;
    return cache + first * row_stride;  // caller steps by row_stride
  } else {
    for (int64_t j = 0; j < count; ++j)
      load_row(cache + (first + j) * row_stride, scratch + j * head_dim, head_dim);
    return scratch;
  }
}

template <typename T>
void attend_tile(const PagedAttentionArgs& a, int64_t seq, int64_t kv_head, int64_t tile) {
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int64_t tokens_per_tile = std::max<int64_t>(1, kRowsPerTile / group);
  const int64_t hd = a.head_dim, bs = a.block_size;
  const int64_t q_begin = a.query_start_loc[seq];
  const int64_t chunk = a.query_start_loc[seq + 1] - q_begin;
  const int64_t ctx = a.seq_lens[seq];
  const int64_t t_begin = tile * tokens_per_tile;
  const int64_t t_end = std::min(chunk, t_begin + tokens_per_tile);
  const int64_t rows = (t_end - t_begin) * group;
  const int64_t first_pos = ctx - chunk + t_begin;  // position of the tile's first token
  const int64_t last_pos = ctx - chunk + t_end - 1;
  const int64_t window = a.sliding_window > 0 ? a.sliding_window : ctx + 1;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Row r is token t_begin + r / group, query head kv_head * group + r % group.
  std::vector<float> q(rows * hd), acc(rows * hd, 0.f), m(rows, neg_inf), l(rows, 0.f);
  // Score rows are padded by a vector so the vector exp may run past hi.
  const int64_t score_stride = bs + kLanes;
  std::vector<float> scores(rows * score_stride), k_buf(bs * hd), v_buf(bs * hd);
  const T* query = static_cast<const T*>(a.query);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = q_begin + t_begin + r / group;
    const int64_t head = kv_head * group + r % group;
    load_row(query + (token * a.num_heads + head) * hd, q.data() + r * hd, hd);
  }

  const T* k_cache = static_cast<const T*>(a.key_cache);
  const T* v_cache = static_cast<const T*>(a.value_cache);
  const int64_t row_stride = a.num_kv_heads * hd;  // between tokens of a block
  const int32_t* table = a.block_tables + seq * a.max_blocks_per_seq;
  const int64_t key_lo = std::max<int64_t>(0, first_pos - window + 1);
  for (int64_t b = key_lo / bs; b * bs <= last_pos; ++b) {
    const int64_t key0 = b * bs;
    const int64_t count = std::min(bs, last_pos + 1 - key0);  // never past the context
    const int64_t block_offset = int64_t(table[b]) * bs * row_stride + kv_head * hd;
    const float* keys = block_rows(k_cache + block_offset, 0, count, row_stride, hd, k_buf.data());
    const int64_t key_step = std::is_same_v<T, float> ? row_stride : hd;
    const float* values = nullptr;  // converted lazily: only if some row uses the block

    // Scores of every row against the keys any row of the tile may use; each
    // row then takes only its own causal / window range of them.
    const int64_t j0 = std::max(key0, key_lo) - key0;
    for (int64_t j = j0; j < count; ++j) {
      const float* key = keys + j * key_step;
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) {
        float dots[4];
        dot4(q.data() + r * hd, key, hd, dots);
        for (int i = 0; i < 4; ++i) scores[(r + i) * score_stride + j] = dots[i] * a.scale;
      }
      for (; r < rows; ++r) scores[r * score_stride + j] = dot(q.data() + r * hd, key, hd) * a.scale;
    }

    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = first_pos + r / group;
      const int64_t lo = std::max(key0, pos - window + 1) - key0;
      const int64_t hi = std::min(key0 + count, pos + 1) - key0;
      if (lo >= hi) continue;  // block fully masked for this row: state untouched
      float* s = scores.data() + r * score_stride;
      float block_max = neg_inf;
      for (int64_t j = lo; j < hi; ++j) block_max = std::max(block_max, s[j]);
      const float m_new = std::max(m[r], block_max);
      const float alpha = exp_nonpositive(m[r] - m_new);  // 0 on the first visited block
      float* o = acc.data() + r * hd;
      if (alpha != 1.f) scale_row(alpha, o, hd);  // skipping a multiply by 1 is exact
      // Unnormalized probabilities, in place; kLanes at a time (scores has
      // room: rows are bs apart and bs is padded to whole vectors).
      for (int64_t j = lo; j < hi; j += kLanes)
        store(s + j, exp_nonpositive(load(s + j) - m_new));
      float sum = 0.f;
      for (int64_t j = lo; j < hi; ++j) sum += s[j];
      if (!values) values = block_rows(v_cache + block_offset, 0, count, row_stride, hd, v_buf.data());
      accumulate_values(s + lo, values + lo * key_step, hi - lo, key_step, o, hd);
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
    }
  }

  T* out = static_cast<T*>(a.out);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = q_begin + t_begin + r / group;
    const int64_t head = kv_head * group + r % group;
    const float inv = 1.f / l[r];
    T* dst = out + (token * a.num_heads + head) * hd;
    for (int64_t d = 0; d < hd; ++d) dst[d] = from_float<T>(acc[r * hd + d] * inv);
  }
}

template <typename T>
void run(const PagedAttentionArgs& a, const ParallelFor& parallel_for) {
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int64_t tokens_per_tile = std::max<int64_t>(1, kRowsPerTile / group);
  // tile_start[i]: index of sequence i's first tile in the flattened tile list.
  std::vector<int64_t> tile_start(a.num_seqs + 1, 0);
  for (int64_t i = 0; i < a.num_seqs; ++i) {
    const int64_t chunk = a.query_start_loc[i + 1] - a.query_start_loc[i];
    tile_start[i + 1] = tile_start[i] + (chunk + tokens_per_tile - 1) / tokens_per_tile;
  }
  const int64_t items = tile_start[a.num_seqs] * a.num_kv_heads;
  parallel_for(items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / a.num_kv_heads;
      const int64_t seq =
          std::upper_bound(tile_start.begin(), tile_start.end(), tile) - tile_start.begin() - 1;
      attend_tile<T>(a, seq, item % a.num_kv_heads, tile - tile_start[seq]);
    }
  });
}

}  // namespace

void KF_CONCAT(paged_attention_cpu_, KEVLARFLOW_CPU_ISA)(const PagedAttentionArgs& args,
                                                         const ParallelFor& parallel_for) {
  switch (args.dtype) {
    case DType::kFloat32: return run<float>(args, parallel_for);
    case DType::kBFloat16: return run<bf16>(args, parallel_for);
    case DType::kFloat16: return run<fp16>(args, parallel_for);
  }
}

}  // namespace kevlarflow
