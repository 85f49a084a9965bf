// The kernels of CUDA paged attention (semantics:
// kevlarflow/reference.py::paged_attention); paged_attention_cuda.cu launches
// them.
//
// Split over the context. A "row" is one (query token, query head) pair of a
// sequence's chunk; the heads of one KV group are consecutive rows, so a row
// block of a CTA reads one KV head, once for all its query heads (GQA). The
// keys are cut into partitions of kPartitionKeys positions, aligned to
// absolute key positions. Two kernels run per launch:
//
//   partition_kernel, grid (sequence x partition, row block, KV head): for each
//     of its rows, attention over the keys of one partition, written to an fp32
//     workspace as a partial (running max m, running sum l, unnormalised
//     accumulator acc). A CTA whose partition holds no key its rows attend to
//     exits at once, and writes nothing.
//   merge_kernel, grid (sequence, row block): for each row, its partials in
//     ascending partition order, m = max m_i, w_i = exp2(m_i - m),
//     l = sum l_i w_i, acc = sum acc_i w_i, out = acc / l, in the output dtype.
//     It reads exactly the partitions holding a key the row attends to: those
//     are the partitions whose partial was written.
//
// Splitting keeps the GPU busy where one CTA per (sequence, row block, KV head)
// could not: a decode batch of 32 sequences x 8 KV heads was 256 CTAs, each
// walking thousands of keys in series; at 4096 positions it is now 2048 CTAs.
//
// Inside a partition, 4 warps walk the keys in tiles of 32 positions (lane k
// of a warp owns key k of a tile). K/V tiles are copied from the cache with
// 16-byte cp.async (a cache row is head_dim contiguous elements), kept in their
// storage dtype in shared memory (half the bytes of float for bf16/fp16, so
// more CTAs fit on an SM), and double buffered: the copy of the next tile is in
// flight while the warps compute on this one. Warp w owns rows w, w + 4, ...
// of the row block: for a row, lane k computes q . k_k serially over the dims
// (K rows padded by 16 bytes, so the 32 lanes read 32 keys without bank
// conflicts), the warp does the online softmax over the tile with butterfly
// reductions, and then lane l accumulates p_k * v_k over its own output dims,
// key by key in ascending order. Only the cache slots the CTA's rows attend
// to are read; the rest of a tile is zeroed, so keys at positions >= seq_len
// (and blocks outside the sliding window) are never loaded.
//
// Batch invariance: a token's output bits do not depend on the batch, on the
// chunk it sits in, or on the launch configuration (rows per CTA, grid size,
// how many launches the workspace needs). Everything a row computes depends
// only on the row and the absolute key positions: partitions and tiles are
// aligned to absolute positions; a row updates its softmax state only with the
// keys it attends to (the scores of other keys of a tile are dropped by a
// select, and the P.V loop skips them by a predicate, never multiplying them by
// zero); every sum runs in a fixed order (dims in order inside a lane, a fixed
// butterfly across lanes, keys in ascending order, partitions in ascending
// order); each rounding step is written out (fmaf, __fmul_rn, __fsub_rn), so
// the compiler's contraction choices cannot differ between kernel variants;
// and every row goes through the same merge, even a row with one partition.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "cuda_device.cuh"
#include "paged_attention.h"

namespace kevlarflow::paged_attention_kernels {

using namespace cuda_device;

constexpr int kMaxHeadDim = 256;
constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * kWarpSize;
// Keys per tile: one per lane.
constexpr int kTile = kWarpSize;
// Keys per partition. Fixed, never derived from the batch: a row's partials,
// and so its output bits, depend on where the partition boundaries fall.
constexpr int kPartitionKeys = 512;
static_assert(kPartitionKeys % kTile == 0, "partitions hold whole tiles");
// K/V tiles in flight per CTA: one being computed on, one being copied.
constexpr int kStages = 2;
constexpr float kLog2e = 1.4426950408889634f;

// What one launch covers. Tokens [token_begin, token_end) of the batch; the
// workspace holds workspace_tokens tokens' partials, the partials of token t
// at (t - token_begin).
struct Launch {
  int64_t token_begin;
  int64_t token_end;
  int64_t workspace_tokens;
  int num_partitions;
  bool vectorized;  // 16-byte cache loads (the caches are 16-byte aligned)
};

// A sequence's chunk, restricted to the tokens of the launch.
struct SeqChunk {
  int64_t q_begin;  // batch index of the chunk's first token
  int chunk_pos;    // position of the chunk's first token
  int64_t t_lo;     // the launch's tokens of the chunk: [t_lo, t_hi), chunk-relative
  int64_t t_hi;
};

__device__ __forceinline__ SeqChunk seq_chunk(const PagedAttentionArgs& args, const Launch& launch,
                                              int seq) {
  SeqChunk c;
  c.q_begin = args.query_start_loc[seq];
  const int64_t q_end = args.query_start_loc[seq + 1];
  c.chunk_pos = static_cast<int>(args.seq_lens[seq] - (q_end - c.q_begin));
  const int64_t lo = max(c.q_begin, launch.token_begin);
  const int64_t hi = min(q_end, launch.token_end);
  c.t_lo = lo - c.q_begin;
  c.t_hi = max(hi, lo) - c.q_begin;
  return c;
}

// The first key a query at position pos attends to (the last is pos itself).
__device__ __forceinline__ int first_key_of(int pos, int64_t window) {
  return window > 0 ? static_cast<int>(max(int64_t(0), int64_t(pos) - window + 1)) : 0;
}

// Shared memory of partition_kernel: ROWS rows per CTA, head dims padded to
// D_PAD (64, 128 or 256).
template <typename T, int D_PAD, int ROWS>
struct PartitionLayout {
  static constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));  // per 16-byte copy
  static constexpr int kChunks = D_PAD / kChunkElems;                   // per padded row
  // K rows are padded by 16 bytes: the 32 lanes of a warp read 16 bytes each
  // of 32 different keys, which then fall in distinct banks.
  static constexpr int kKStride = D_PAD + kChunkElems;
  static constexpr int kRowsPerWarp = ROWS / kNumWarps;
  static constexpr int kDimsPerLane = D_PAD / kWarpSize;  // output dims a lane accumulates
  static constexpr size_t kOffsetBytes = kPartitionKeys * sizeof(int64_t);
  static constexpr size_t kKBytes = size_t(kStages) * kTile * kKStride * sizeof(T);
  static constexpr size_t kVBytes = size_t(kStages) * kTile * D_PAD * sizeof(T);
  static constexpr size_t kQBytes = size_t(ROWS) * D_PAD * sizeof(float);
  static constexpr size_t kProbBytes = size_t(kNumWarps) * kTile * kRowsPerWarp * sizeof(float);
  static constexpr size_t kBytes = kOffsetBytes + kKBytes + kVBytes + kQBytes + kProbBytes;
  static_assert(ROWS % kNumWarps == 0, "rows are dealt to warps evenly");
  static_assert(kThreads % kChunks == 0 && kTile % (kThreads / kChunks) == 0,
                "a tile is copied in whole passes of the CTA");
  static_assert(kKBytes % 16 == 0 && kVBytes % 16 == 0 && kQBytes % 16 == 0,
                "16-byte aligned regions");
};

// One row's softmax state over the keys of its partition.
template <int DPL>
struct RowState {
  bool has_keys;  // the row exists and attends to a key of the partition
  int first;      // attended keys of the partition, absolute positions, inclusive
  int last;
  float max_score;  // running max of the scores, log2 units (scale * log2(e) folded in)
  float sum;        // running sum of exp2(score - max_score)
  float acc[DPL];   // running sum of exp2(score - max_score) * v, this lane's dims
};

// Issues the copies of keys tile_start .. tile_start + kTile - 1 of one KV
// head into a stage. Positions in [load_first, load_last] come from the cache
// (offsets[pos - load_first] is the element offset of their K/V row); the
// others are zeroed and never read from the cache. Columns past head_dim are
// not written (nothing reads them).
template <typename T, int D_PAD, int ROWS>
__device__ __forceinline__ void copy_tile(T* k_stage, T* v_stage, const T* key_cache,
                                          const T* value_cache, const int64_t* offsets,
                                          int tile_start, int load_first, int load_last,
                                          int head_dim, bool vectorized) {
  using L = PartitionLayout<T, D_PAD, ROWS>;
  constexpr int CE = L::kChunkElems;
  constexpr int kKeysPerPass = kThreads / L::kChunks;
  // Consecutive threads copy consecutive 16-byte chunks of one key's row.
  const int col = threadIdx.x % L::kChunks;
  if (col * CE >= head_dim) return;
  const int key0 = threadIdx.x / L::kChunks;
#pragma unroll
  for (int pass = 0; pass < kTile / kKeysPerPass; ++pass) {
    const int key = key0 + pass * kKeysPerPass;
    const int pos = tile_start + key;
    T* k_dst = k_stage + key * L::kKStride + col * CE;
    T* v_dst = v_stage + key * D_PAD + col * CE;
    if (pos >= load_first && pos <= load_last) {
      const int64_t offset = offsets[pos - load_first] + col * CE;
      if (vectorized) {
        copy16_async(k_dst, key_cache + offset);
        copy16_async(v_dst, value_cache + offset);
      } else {
#pragma unroll
        for (int e = 0; e < CE; ++e) {
          k_dst[e] = key_cache[offset + e];
          v_dst[e] = value_cache[offset + e];
        }
      }
    } else {
      *reinterpret_cast<uint4*>(k_dst) = make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(v_dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Online-softmax update of a warp's rows with one tile (warp-level: every
// branch below is uniform across the warp).
template <typename T, int D_PAD, int ROWS>
__device__ __forceinline__ void attend_tile(
    RowState<PartitionLayout<T, D_PAD, ROWS>::kDimsPerLane> (
        &rows)[PartitionLayout<T, D_PAD, ROWS>::kRowsPerWarp],
    const T* k_stage, const T* v_stage, const float* q_rows, float* probs, int tile_start,
    int head_dim, float score_scale, int warp, int lane) {
  using L = PartitionLayout<T, D_PAD, ROWS>;
  constexpr int RPW = L::kRowsPerWarp;
  constexpr int CE = L::kChunkElems;
  constexpr int DPL = L::kDimsPerLane;

  // Tile-relative keys each row attends to.
  bool sees[RPW];
  int lo[RPW], hi[RPW];
  bool any = false;
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    lo[i] = max(rows[i].first - tile_start, 0);
    hi[i] = min(rows[i].last - tile_start, kTile - 1);
    sees[i] = rows[i].has_keys && lo[i] <= hi[i];
    any = any || sees[i];
  }
  if (!any) return;

  // Scores: lane k holds q . k for key tile_start + k, dims in order.
  float dot[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) dot[i] = 0.f;
  const T* k_row = k_stage + lane * L::kKStride;
  const int chunks = head_dim / CE;
#pragma unroll
  for (int c = 0; c < L::kChunks; ++c) {
    if (c < chunks) {
      float k_vals[CE];
      load_floats<T, CE>(k_row + c * CE, k_vals);
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        if (!sees[i]) continue;
        float q_vals[CE];  // the same address on every lane: a broadcast
        load_floats<float, CE>(q_rows + (warp + i * kNumWarps) * D_PAD + c * CE, q_vals);
#pragma unroll
        for (int e = 0; e < CE; ++e) dot[i] = fmaf(q_vals[e], k_vals[e], dot[i]);
      }
    }
  }

  // Softmax. Scores of keys the row does not attend to (zeroed slots, or real
  // keys of other rows) are dropped by the select, whatever their value.
  const int pos = tile_start + lane;
  float p_lane[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    p_lane[i] = 0.f;
    if (!sees[i]) continue;
    RowState<DPL>& row = rows[i];
    const bool in_range = pos >= row.first && pos <= row.last;
    const float score = in_range ? __fmul_rn(dot[i], score_scale) : -CUDART_INF_F;
    // At least one key is in range, so new_max is finite; on the row's first
    // tile the rescale is exp2(-inf) = 0, applied to a still-zero sum and acc.
    const float new_max = fmaxf(row.max_score, warp_max(score));
    const float p = in_range ? exp2f(__fsub_rn(score, new_max)) : 0.f;
    const float rescale = exp2f(__fsub_rn(row.max_score, new_max));
    row.sum = fmaf(row.sum, rescale, warp_sum(p));
#pragma unroll
    for (int d = 0; d < DPL; ++d) row.acc[d] = __fmul_rn(row.acc[d], rescale);
    row.max_score = new_max;
    p_lane[i] = p;
  }
  // probs[k][i]: the probability of key k for the warp's row i.
  store_floats<RPW>(probs + lane * RPW, p_lane);
  __syncwarp();

  // P.V: lane l accumulates dims l * DPL .. l * DPL + DPL - 1, key by key.
  // (Lanes past head_dim compute on unused columns and never store them.)
  int k_lo = kTile, k_hi = -1;
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    if (sees[i]) {
      k_lo = min(k_lo, lo[i]);
      k_hi = max(k_hi, hi[i]);
    }
  }
  bool same_keys = true;  // every row that sees the tile attends to [k_lo, k_hi]
#pragma unroll
  for (int i = 0; i < RPW; ++i) same_keys = same_keys && (!sees[i] || (lo[i] == k_lo && hi[i] == k_hi));
  const T* v_col = v_stage + lane * DPL;
  // Both loops add the same products in the same order; the first (decode
  // rows, and every tile away from a diagonal or a window's start) only skips
  // the per-key range checks.
  if (same_keys) {
#pragma unroll 4
    for (int k = k_lo; k <= k_hi; ++k) {
      float v_vals[DPL];
      load_floats<T, DPL>(v_col + k * D_PAD, v_vals);
      float p_key[RPW];
      load_floats<float, RPW>(probs + k * RPW, p_key);  // a broadcast
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        if (sees[i]) {
#pragma unroll
          for (int d = 0; d < DPL; ++d) rows[i].acc[d] = fmaf(p_key[i], v_vals[d], rows[i].acc[d]);
        }
      }
    }
  } else {
    for (int k = k_lo; k <= k_hi; ++k) {
      float v_vals[DPL];
      load_floats<T, DPL>(v_col + k * D_PAD, v_vals);
      float p_key[RPW];
      load_floats<float, RPW>(probs + k * RPW, p_key);
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        if (sees[i] && k >= lo[i] && k <= hi[i]) {
#pragma unroll
          for (int d = 0; d < DPL; ++d) rows[i].acc[d] = fmaf(p_key[i], v_vals[d], rows[i].acc[d]);
        }
      }
    }
  }
}

template <typename T, int D_PAD, int ROWS>
__global__ void __launch_bounds__(kThreads)
    partition_kernel(const PagedAttentionArgs args, const Launch launch) {
  using L = PartitionLayout<T, D_PAD, ROWS>;
  constexpr int RPW = L::kRowsPerWarp;
  constexpr int DPL = L::kDimsPerLane;
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* offsets = reinterpret_cast<int64_t*>(smem);
  T* k_stages = reinterpret_cast<T*>(smem + L::kOffsetBytes);
  T* v_stages = reinterpret_cast<T*>(smem + L::kOffsetBytes + L::kKBytes);
  float* q_rows = reinterpret_cast<float*>(smem + L::kOffsetBytes + L::kKBytes + L::kVBytes);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  float* probs = q_rows + ROWS * D_PAD + warp * kTile * RPW;

  const int num_partitions = launch.num_partitions;
  const int seq = static_cast<int>(blockIdx.x / num_partitions);
  const int part = static_cast<int>(blockIdx.x % num_partitions);
  const int kv_head = blockIdx.z;
  const int head_dim = static_cast<int>(args.head_dim);
  const int block_size = static_cast<int>(args.block_size);
  const int64_t group = args.num_heads / args.num_kv_heads;
  const int64_t window = args.sliding_window;
  const SeqChunk chunk = seq_chunk(args, launch, seq);
  const int64_t rows_lo = chunk.t_lo * group;  // the launch's rows of this sequence and KV head
  const int64_t rows_hi = chunk.t_hi * group;
  const int part_first = part * kPartitionKeys;
  // The last key a block table can name: inconsistent trusted inputs (a
  // context wider than the table) never make a read past the table's row.
  const int part_last = min(part_first + kPartitionKeys - 1,
                            static_cast<int>(args.max_blocks_per_seq * args.block_size) - 1);

  const int32_t* block_table = args.block_tables + int64_t(seq) * args.max_blocks_per_seq;
  const T* query = static_cast<const T*>(args.query);
  const T* key_cache = static_cast<const T*>(args.key_cache);
  const T* value_cache = static_cast<const T*>(args.value_cache);
  const float score_scale = __fmul_rn(args.scale, kLog2e);
  const int64_t ml_offset = launch.workspace_tokens * args.num_heads * num_partitions * args.head_dim;
  float* ws_acc = args.workspace;
  float* ws_ml = args.workspace + ml_offset;

  // The loop only matters when the grid's y size was capped. Every condition
  // that skips or ends an iteration is uniform across the CTA.
  for (int64_t row_base = rows_lo + int64_t(blockIdx.y) * ROWS; row_base < rows_hi;
       row_base += int64_t(gridDim.y) * ROWS) {
    // Keys any row of the block attends to inside the partition: rows are
    // ordered by token, and both ends of a token's key range grow with its
    // position.
    const int64_t last_index = min(row_base + ROWS, rows_hi) - 1;
    const int load_first =
        max(first_key_of(chunk.chunk_pos + static_cast<int>(row_base / group), window), part_first);
    const int load_last = min(chunk.chunk_pos + static_cast<int>(last_index / group), part_last);
    if (load_first > load_last) continue;  // no key here for these rows: nothing written
    __syncthreads();  // a previous row block is done with shared memory

    // Element offsets of the K/V rows of every key loaded (one division per
    // key, not one per copy).
    for (int j = threadIdx.x; j <= load_last - load_first; j += kThreads) {
      const int pos = load_first + j;
      const int64_t block = block_table[pos / block_size];
      offsets[j] = ((block * block_size + pos % block_size) * args.num_kv_heads + kv_head) *
                   args.head_dim;
    }
    // The block's queries, as float.
    for (int r = warp; r < ROWS; r += kNumWarps) {
      const int64_t index = row_base + r;
      if (index >= rows_hi) break;
      const int64_t head = int64_t(kv_head) * group + index % group;
      const T* q = query + ((chunk.q_begin + index / group) * args.num_heads + head) * head_dim;
      for (int d = lane; d < head_dim; d += kWarpSize) q_rows[r * D_PAD + d] = as_float(q[d]);
    }

    RowState<DPL> rows[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int64_t index = row_base + warp + i * kNumWarps;
      const int pos = chunk.chunk_pos + static_cast<int>(index / group);
      rows[i].first = max(first_key_of(pos, window), part_first);
      rows[i].last = min(pos, part_last);
      rows[i].has_keys = index < rows_hi && rows[i].first <= rows[i].last;
      rows[i].max_score = -CUDART_INF_F;
      rows[i].sum = 0.f;
#pragma unroll
      for (int d = 0; d < DPL; ++d) rows[i].acc[d] = 0.f;
    }
    __syncthreads();  // offsets and queries are visible

    const int first_tile = load_first - load_first % kTile;
    const int num_tiles = (load_last - first_tile) / kTile + 1;
    copy_tile<T, D_PAD, ROWS>(k_stages, v_stages, key_cache, value_cache, offsets, first_tile,
                              load_first, load_last, head_dim, launch.vectorized);
    copy_async_commit();
    for (int t = 0; t < num_tiles; ++t) {
      const int stage = t % kStages;
      if (t + 1 < num_tiles) {
        // The next stage was last read in iteration t - 1, before its final barrier.
        const int next = (t + 1) % kStages;
        copy_tile<T, D_PAD, ROWS>(k_stages + next * kTile * L::kKStride,
                                  v_stages + next * kTile * D_PAD, key_cache, value_cache,
                                  offsets, first_tile + (t + 1) * kTile, load_first, load_last,
                                  head_dim, launch.vectorized);
      }
      copy_async_commit();  // possibly empty: keeps one group per iteration
      copy_async_wait<1>();  // this thread's copies of tile t have landed
      __syncthreads();       // and everyone else's
      attend_tile<T, D_PAD, ROWS>(rows, k_stages + stage * kTile * L::kKStride,
                                  v_stages + stage * kTile * D_PAD, q_rows, probs,
                                  first_tile + t * kTile, head_dim, score_scale, warp, lane);
      __syncthreads();  // every warp is done with this stage
    }
    copy_async_wait<0>();

    // The partials: acc over this lane's dims, and (max, sum) from lane 0.
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      if (!rows[i].has_keys) continue;
      const int64_t index = row_base + warp + i * kNumWarps;
      const int64_t head = int64_t(kv_head) * group + index % group;
      const int64_t token = chunk.q_begin + index / group - launch.token_begin;
      const int64_t slot = (token * args.num_heads + head) * num_partitions + part;
      if (lane * DPL < head_dim) store_floats<DPL>(ws_acc + slot * head_dim + lane * DPL, rows[i].acc);
      if (lane == 0)
        *reinterpret_cast<float2*>(ws_ml + 2 * slot) = make_float2(rows[i].max_score, rows[i].sum);
    }
  }
}

// One warp per row: merges the row's partials in ascending partition order.
template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const PagedAttentionArgs args, const Launch launch) {
  constexpr int DPL = D_PAD / kWarpSize;
  const int seq = blockIdx.x;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int head_dim = static_cast<int>(args.head_dim);
  const int64_t num_heads = args.num_heads;
  const int num_partitions = launch.num_partitions;
  const SeqChunk chunk = seq_chunk(args, launch, seq);
  const int64_t rows_lo = chunk.t_lo * num_heads;
  const int64_t rows_hi = chunk.t_hi * num_heads;
  const int64_t ml_offset = launch.workspace_tokens * num_heads * num_partitions * args.head_dim;
  const float* ws_acc = args.workspace;
  const float* ws_ml = args.workspace + ml_offset;
  T* out = static_cast<T*>(args.out);
  const bool has_dims = lane * DPL < head_dim;

  for (int64_t index = rows_lo + int64_t(blockIdx.y) * kNumWarps + warp; index < rows_hi;
       index += int64_t(gridDim.y) * kNumWarps) {
    const int64_t token = index / num_heads;
    const int64_t head = index % num_heads;
    const int pos = chunk.chunk_pos + static_cast<int>(token);
    // Exactly the partitions holding a key of [first_key, pos]: each was written.
    // Inconsistent trusted inputs (a chunk longer than its context, a context
    // wider than the block table) read no partition, or none past the row's
    // slots: the row gets zeros or a wrong value, never memory out of bounds.
    const int first_part = first_key_of(pos, args.sliding_window) / kPartitionKeys;
    const int last_part = pos < 0 ? -1
                                  : min(pos / kPartitionKeys, num_partitions - 1);
    const int64_t slot0 =
        ((chunk.q_begin + token - launch.token_begin) * num_heads + head) * num_partitions;
    float max_score = -CUDART_INF_F;
    for (int p = first_part; p <= last_part; ++p) max_score = fmaxf(max_score, ws_ml[2 * (slot0 + p)]);
    float sum = 0.f;
    float acc[DPL];
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] = 0.f;
    for (int p = first_part; p <= last_part; ++p) {
      const float2 ml = *reinterpret_cast<const float2*>(ws_ml + 2 * (slot0 + p));
      const float weight = exp2f(__fsub_rn(ml.x, max_score));
      sum = fmaf(ml.y, weight, sum);
      if (has_dims) {
        float part_acc[DPL];
        load_floats<float, DPL>(ws_acc + (slot0 + p) * head_dim + lane * DPL, part_acc);
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[d] = fmaf(part_acc[d], weight, acc[d]);
      }
    }
    if (has_dims) {
      T* dst = out + ((chunk.q_begin + token) * num_heads + head) * head_dim + lane * DPL;
      // A row with no keys (only possible for inconsistent inputs) gets zeros.
#pragma unroll
      for (int d = 0; d < DPL; ++d) dst[d] = float_to<T>(sum > 0.f ? __fdiv_rn(acc[d], sum) : 0.f);
    }
  }
}

}  // namespace kevlarflow::paged_attention_kernels
