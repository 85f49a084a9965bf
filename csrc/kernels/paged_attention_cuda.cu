// CUDA paged attention (semantics: kevlarflow/reference.py::paged_attention).
//
// Grid (num_seqs, row blocks, num_kv_heads). A "row" is one (query token, query
// head) pair of a sequence's chunk; the heads of one KV group are consecutive
// rows, so a CTA's rows all read the same KV head. Each warp owns up to
// ROWS_PER_WARP rows and keeps their query, running max, running sum and
// output accumulator in registers (lane l holds dims l, l+32, ...). The CTA
// walks the keys its rows need in tiles of TILE positions; all threads load
// each K/V tile into shared memory as float (32 KB at most: 2 x TILE x 32*DPL
// floats), then every warp updates its rows with an online softmax. Only the
// cache slots the CTA's rows attend to are read; the rest of a tile is zeroed.
//
// Batch invariance: a row's arithmetic depends only on the row itself. Tiles
// are aligned to absolute key positions, a row's softmax only sees keys it
// attends to, and every sum runs in a fixed order (lane-serial partial dot
// products, a fixed butterfly across lanes, keys in ascending order). So
// neither the launch configuration nor the other rows in the batch change a
// single bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "paged_attention.h"

namespace kevlarflow {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxHeadDim = 256;

__device__ __forceinline__ float as_float(float x) { return x; }
__device__ __forceinline__ float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float as_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T float_to(float x);
template <>
__device__ __forceinline__ float float_to<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 float_to<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half float_to<__half>(float x) {
  return __float2half_rn(x);
}

// Butterfly reductions: every lane ends with the same bits, because each step
// adds the same two values on both partner lanes.
__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// Keys per tile. Depends on the head size only (never on the batch), which keeps
// the K and V tiles at 32 KB at most for every head size.
__host__ __device__ constexpr int tile_keys(int dims_per_lane) {
  return dims_per_lane <= 4 ? 32 : 16;
}

// Loads VEC consecutive elements as floats; VEC > 1 means one 16-byte load.
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* src, float (&dst)[VEC]) {
  if constexpr (VEC == 1) {
    dst[0] = as_float(*src);
  } else {
    static_assert(VEC * sizeof(T) == sizeof(uint4), "vector loads are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    T elems[VEC];
    memcpy(elems, &raw, sizeof(raw));
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = as_float(elems[e]);
  }
}

template <int VEC>
__device__ __forceinline__ void store_floats(float* dst, const float (&src)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 4)
      *reinterpret_cast<float4*>(dst + e) = make_float4(src[e], src[e + 1], src[e + 2], src[e + 3]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = src[e];
  }
}

// Fills the tiles with keys tile_start .. tile_start + TILE - 1 of one KV head.
// Only positions in [load_first, load_last] are read from the cache; the rest
// of the tile is zeroed (their scores are discarded), so slots past the
// context and blocks no row attends to are never touched.
template <typename T, int VEC, int TILE, int MAX_DIM>
__device__ void load_kv_tile(float (&k_tile)[TILE][MAX_DIM], float (&v_tile)[TILE][MAX_DIM],
                             const PagedAttentionArgs& args, const int32_t* block_table,
                             int kv_head, int tile_start, int load_first, int load_last) {
  const T* key_cache = static_cast<const T*>(args.key_cache);
  const T* value_cache = static_cast<const T*>(args.value_cache);
  const int head_dim = static_cast<int>(args.head_dim);
  const int block_size = static_cast<int>(args.block_size);
  const int chunks_per_key = head_dim / VEC;
  // Consecutive threads take consecutive chunks of one key's head vector.
  for (int c = threadIdx.x; c < TILE * chunks_per_key; c += blockDim.x) {
    const int key = c / chunks_per_key;
    const int dim = (c - key * chunks_per_key) * VEC;
    const int pos = tile_start + key;
    float k_vals[VEC], v_vals[VEC];
    if (pos >= load_first && pos <= load_last) {
      const int64_t block = block_table[pos / block_size];
      const int64_t slot = block * block_size + pos % block_size;
      const int64_t offset = (slot * args.num_kv_heads + kv_head) * head_dim + dim;
      load_as_float<T, VEC>(key_cache + offset, k_vals);
      load_as_float<T, VEC>(value_cache + offset, v_vals);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) k_vals[e] = v_vals[e] = 0.f;
    }
    store_floats<VEC>(&k_tile[key][dim], k_vals);
    store_floats<VEC>(&v_tile[key][dim], v_vals);
  }
}

// One query row owned by a warp; arrays hold this lane's dims lane + 32 * i.
template <int DPL>
struct QueryRow {
  bool active;     // the row exists (the CTA's last row block may be partial)
  int64_t offset;  // element offset of the row in query and out
  int first_key;   // attended key positions, inclusive
  int last_key;
  float max_score;  // running max of the scaled scores
  float sum_exp;    // running sum of exp(score - max_score)
  float q[DPL];
  float acc[DPL];  // running sum of exp(score - max_score) * v
};

// Online-softmax update of one row with the keys of one tile it attends to.
template <int DPL, int TILE, int MAX_DIM>
__device__ __forceinline__ void attend_tile(QueryRow<DPL>& row,
                                            const float (&k_tile)[TILE][MAX_DIM],
                                            const float (&v_tile)[TILE][MAX_DIM], int tile_start,
                                            int lane, float scale) {
  const int first = max(row.first_key, tile_start) - tile_start;
  const int last = min(row.last_key, tile_start + TILE - 1) - tile_start;
  if (first > last) return;  // warp-uniform: the row sees nothing in this tile

  // Lane k ends up holding the score of key k of the tile. All TILE dot
  // products are computed (a fixed trip count lets the independent shuffle
  // reductions overlap); keys outside [first, last] are zeros or real keys,
  // never unloaded slots, and their scores are dropped by the select below.
  float score = 0.f;
#pragma unroll 8
  for (int k = 0; k < TILE; ++k) {
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) dot = fmaf(row.q[i], k_tile[k][lane + i * kWarpSize], dot);
    dot = warp_sum(dot);
    if (lane == k) score = dot;
  }
  const bool in_range = lane >= first && lane <= last;
  score = in_range ? score * scale : -CUDART_INF_F;

  // At least one key is in range, so new_max is finite; on the row's first
  // tile the rescale is exp(-inf) = 0, applied to a still-zero sum and acc.
  const float new_max = fmaxf(row.max_score, warp_max(score));
  const float prob = in_range ? expf(score - new_max) : 0.f;
  const float rescale = expf(row.max_score - new_max);
  row.sum_exp = row.sum_exp * rescale + warp_sum(prob);
#pragma unroll
  for (int i = 0; i < DPL; ++i) row.acc[i] *= rescale;
  for (int k = first; k <= last; ++k) {
    const float p = __shfl_sync(kFullMask, prob, k);
#pragma unroll
    for (int i = 0; i < DPL; ++i) row.acc[i] = fmaf(p, v_tile[k][lane + i * kWarpSize], row.acc[i]);
  }
  row.max_score = new_max;
}

// DPL: head dims per lane (head_dim <= 32 * DPL). Rows of a CTA are dealt to
// warps round-robin, so a partial row block still keeps every warp busy.
template <typename T, int DPL, int NUM_WARPS, int ROWS_PER_WARP>
__global__ void __launch_bounds__(NUM_WARPS * kWarpSize)
    paged_attention_kernel(const PagedAttentionArgs args, const bool vectorized) {
  constexpr int TILE = tile_keys(DPL);
  constexpr int MAX_DIM = DPL * kWarpSize;
  constexpr int ROWS = NUM_WARPS * ROWS_PER_WARP;
  constexpr int VEC = sizeof(uint4) / sizeof(T);
  __shared__ __align__(16) float k_tile[TILE][MAX_DIM];
  __shared__ __align__(16) float v_tile[TILE][MAX_DIM];

  const int seq = blockIdx.x;
  const int kv_head = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int head_dim = static_cast<int>(args.head_dim);
  const int64_t group = args.num_heads / args.num_kv_heads;
  const int64_t q_begin = args.query_start_loc[seq];
  const int chunk_len = static_cast<int>(args.query_start_loc[seq + 1] - q_begin);
  const int chunk_pos = args.seq_lens[seq] - chunk_len;  // position of the chunk's first token
  const int64_t rows_in_seq = int64_t(chunk_len) * group;
  if (int64_t(blockIdx.y) * ROWS >= rows_in_seq) return;  // CTA-uniform, before any barrier

  const int32_t* block_table = args.block_tables + int64_t(seq) * args.max_blocks_per_seq;
  const T* query = static_cast<const T*>(args.query);
  T* out = static_cast<T*>(args.out);
  const int64_t window = args.sliding_window;
  auto first_key_of = [&](int pos) {
    return window > 0 ? static_cast<int>(max(int64_t(0), int64_t(pos) - window + 1)) : 0;
  };

  // Dims past head_dim stay zero so the dot products need no bounds checks.
  // No barrier needed here: tile loads write other columns, and the barrier
  // after the first load publishes both.
  if (head_dim < MAX_DIM) {
    const int pad = MAX_DIM - head_dim;
    for (int i = threadIdx.x; i < TILE * pad; i += blockDim.x) {
      k_tile[i / pad][head_dim + i % pad] = 0.f;
      v_tile[i / pad][head_dim + i % pad] = 0.f;
    }
  }

  // The loop only matters when the grid's y size was capped.
  for (int64_t row_base = int64_t(blockIdx.y) * ROWS; row_base < rows_in_seq;
       row_base += int64_t(gridDim.y) * ROWS) {
    QueryRow<DPL> rows[ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      QueryRow<DPL>& row = rows[r];
      const int64_t index = row_base + r * NUM_WARPS + warp;
      row.active = index < rows_in_seq;
      const int token = static_cast<int>(index / group);
      const int64_t head = int64_t(kv_head) * group + index % group;
      const int pos = chunk_pos + token;
      row.offset = ((q_begin + token) * args.num_heads + head) * head_dim;
      row.first_key = first_key_of(pos);
      row.last_key = pos;
      row.max_score = -CUDART_INF_F;
      row.sum_exp = 0.f;
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int d = lane + i * kWarpSize;
        row.q[i] = row.active && d < head_dim ? as_float(query[row.offset + d]) : 0.f;
        row.acc[i] = 0.f;
      }
    }

    // Keys needed by any row of this block: rows are ordered by token, and
    // both ends of a token's key range grow with its position.
    const int64_t last_index = min(row_base + ROWS, rows_in_seq) - 1;
    const int cta_first_key = first_key_of(chunk_pos + static_cast<int>(row_base / group));
    const int cta_last_key = chunk_pos + static_cast<int>(last_index / group);
    for (int tile_start = cta_first_key - cta_first_key % TILE; tile_start <= cta_last_key;
         tile_start += TILE) {
      __syncthreads();  // every warp is done with the previous tile
      const int load_first = max(tile_start, cta_first_key);
      const int load_last = min(tile_start + TILE - 1, cta_last_key);
      if (vectorized) {
        load_kv_tile<T, VEC>(k_tile, v_tile, args, block_table, kv_head, tile_start, load_first,
                             load_last);
      } else {
        load_kv_tile<T, 1>(k_tile, v_tile, args, block_table, kv_head, tile_start, load_first,
                           load_last);
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r) {
        if (rows[r].active) attend_tile(rows[r], k_tile, v_tile, tile_start, lane, args.scale);
      }
    }

#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      const QueryRow<DPL>& row = rows[r];
      if (!row.active) continue;
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int d = lane + i * kWarpSize;
        // A row with no keys (only possible for inconsistent inputs) gets zeros.
        if (d < head_dim)
          out[row.offset + d] = float_to<T>(row.sum_exp > 0.f ? row.acc[i] / row.sum_exp : 0.f);
      }
    }
  }
}

template <typename T, int DPL, int NUM_WARPS, int ROWS_PER_WARP>
void launch(const PagedAttentionArgs& args, cudaStream_t stream) {
  constexpr int kRowsPerCta = NUM_WARPS * ROWS_PER_WARP;
  constexpr int64_t kMaxGridY = 65535;  // larger row counts loop inside the kernel
  constexpr int64_t VEC = sizeof(uint4) / sizeof(T);
  const int64_t rows = args.max_query_len * (args.num_heads / args.num_kv_heads);
  const int64_t row_blocks = std::min((rows + kRowsPerCta - 1) / kRowsPerCta, kMaxGridY);
  const auto aligned = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % sizeof(uint4) == 0;
  };
  const bool vectorized =
      args.head_dim % VEC == 0 && aligned(args.key_cache) && aligned(args.value_cache);
  const dim3 grid(static_cast<unsigned>(args.num_seqs), static_cast<unsigned>(row_blocks),
                  static_cast<unsigned>(args.num_kv_heads));
  paged_attention_kernel<T, DPL, NUM_WARPS, ROWS_PER_WARP>
      <<<grid, NUM_WARPS * kWarpSize, 0, stream>>>(args, vectorized);
}

// Fewer rows than a full CTA (decode, small GQA groups) get fewer warps.
template <typename T, int DPL>
void dispatch_rows(const PagedAttentionArgs& args, cudaStream_t stream) {
  const int64_t rows = args.max_query_len * (args.num_heads / args.num_kv_heads);
  if (rows <= 1) {
    launch<T, DPL, 1, 1>(args, stream);
  } else if (rows <= 2) {
    launch<T, DPL, 2, 1>(args, stream);
  } else if (rows <= 4) {
    launch<T, DPL, 4, 1>(args, stream);
  } else {
    launch<T, DPL, 4, 4>(args, stream);
  }
}

template <typename T>
void dispatch_head_dim(const PagedAttentionArgs& args, cudaStream_t stream) {
  if (args.head_dim <= 64) {
    dispatch_rows<T, 2>(args, stream);
  } else if (args.head_dim <= 128) {
    dispatch_rows<T, 4>(args, stream);
  } else {
    dispatch_rows<T, 8>(args, stream);
  }
}

void fail(const std::string& what) { throw std::runtime_error("paged_attention_cuda: " + what); }

}  // namespace

void paged_attention_cuda(const PagedAttentionArgs& args, void* stream) {
  if (args.num_seqs == 0 || args.num_tokens == 0 || args.max_query_len <= 0) return;
  if (args.head_dim <= 0 || args.head_dim > kMaxHeadDim)
    fail("head_dim " + std::to_string(args.head_dim) + " is not in [1, 256]");
  if (args.num_kv_heads <= 0 || args.num_heads % args.num_kv_heads != 0)
    fail("num_heads must be a multiple of num_kv_heads");
  if (args.num_kv_heads > 65535) fail("more than 65535 KV heads");
  if (args.num_seqs > 0x7fffffff) fail("too many sequences for one launch");

  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32:
      dispatch_head_dim<float>(args, cuda_stream);
      break;
    case DType::kBFloat16:
      dispatch_head_dim<__nv_bfloat16>(args, cuda_stream);
      break;
    case DType::kFloat16:
      dispatch_head_dim<__half>(args, cuda_stream);
      break;
    default:
      fail("unsupported dtype");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail(std::string("kernel launch failed: ") + cudaGetErrorString(err));
}

}  // namespace kevlarflow
