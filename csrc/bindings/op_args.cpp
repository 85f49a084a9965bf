#include "op_args.h"

#include <ATen/ATen.h>

#include <cmath>

namespace kevlarflow {
namespace {

DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
}

void check_dims(const at::Tensor& t, int64_t dims, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == dims, name, " must be ", dims, "-D ", shape, ", got shape ", t.sizes());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the other tensors are on ",
              ref.device());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_index_tensor(const at::Tensor& t, at::ScalarType type, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
  check_contiguous(t, name);
}

// The contents of a batch's index tensors, checked on a host copy (small
// tensors): offsets consistent, chunks inside their contexts, every block a
// sequence needs inside the pool. Returns the longest chunk.
int64_t checked_max_query_len(const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                              const at::Tensor& block_tables, int64_t num_tokens,
                              int64_t num_blocks, int64_t block_size) {
  const int64_t num_seqs = seq_lens.size(0);
  const at::Tensor starts = query_start_loc.cpu(), lens = seq_lens.cpu();
  const int32_t* qsl = starts.data_ptr<int32_t>();
  const int32_t* ctx = lens.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0, "query_start_loc[0] must be 0, got ", qsl[0]);
  TORCH_CHECK(qsl[num_seqs] == num_tokens, "query_start_loc[-1] (", qsl[num_seqs],
              ") must equal the number of query tokens (", num_tokens, ")");
  const int64_t max_blocks = block_tables.size(1);
  int64_t max_query_len = 0;
  at::Tensor needed = at::empty({num_seqs}, at::kLong);
  int64_t* needed_ptr = needed.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t chunk = int64_t(qsl[i + 1]) - qsl[i];
    TORCH_CHECK(chunk >= 0, "query_start_loc must be non-decreasing (sequence ", i, ")");
    TORCH_CHECK(ctx[i] >= 0, "seq_lens[", i, "] is negative: ", ctx[i]);
    TORCH_CHECK(chunk <= ctx[i], "sequence ", i, " has ", chunk, " query tokens but seq_len ",
                ctx[i], ": the chunk's K/V must already be in the cache");
    needed_ptr[i] = (int64_t(ctx[i]) + block_size - 1) / block_size;
    TORCH_CHECK(needed_ptr[i] <= max_blocks, "sequence ", i, " needs ", needed_ptr[i],
                " blocks but block_tables has ", max_blocks, " columns");
    max_query_len = std::max(max_query_len, chunk);
  }
  if (num_seqs > 0 && max_blocks > 0) {
    const at::Tensor table = block_tables.cpu();
    const at::Tensor used = at::arange(max_blocks, at::kLong).unsqueeze(0) < needed.unsqueeze(1);
    const at::Tensor bad = used & ((table < 0) | (table >= num_blocks));
    if (bad.any().item<bool>()) {
      const at::Tensor where = bad.nonzero()[0];
      const int64_t s = where[0].item<int64_t>(), b = where[1].item<int64_t>();
      TORCH_CHECK(false, "block_tables[", s, "][", b, "] = ", table[s][b].item<int32_t>(),
                  " is outside the pool of ", num_blocks, " blocks");
    }
  }
  return max_query_len;
}

}  // namespace

PagedAttentionArgs paged_attention_args(const at::Tensor& out, const at::Tensor& query,
                                        const at::Tensor& key_cache, const at::Tensor& value_cache,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                        const at::Tensor& query_start_loc, double scale,
                                        int64_t sliding_window, int64_t max_query_len) {
  check_dims(query, 3, "query", "[num_tokens, num_heads, head_dim]");
  check_dims(key_cache, 4, "key_cache", "[num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache shape ", value_cache.sizes(),
              " differs from key_cache shape ", key_cache.sizes());
  check_dims(block_tables, 2, "block_tables", "[num_seqs, max_blocks_per_seq]");
  check_dims(seq_lens, 1, "seq_lens", "[num_seqs]");
  check_dims(query_start_loc, 1, "query_start_loc", "[num_seqs + 1]");
  for (const auto* t : {&key_cache, &value_cache, &block_tables, &seq_lens, &query_start_loc, &out})
    check_same_device(*t, query, "an argument of paged_attention");

  const DType dtype = kernel_dtype(query, "query");
  TORCH_CHECK_TYPE(key_cache.scalar_type() == query.scalar_type() &&
                       value_cache.scalar_type() == query.scalar_type(),
                   "key_cache and value_cache must have query's dtype ", query.scalar_type(),
                   ", got ", key_cache.scalar_type(), " and ", value_cache.scalar_type());
  check_contiguous(query, "query");
  check_contiguous(key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
  check_index_tensor(block_tables, at::kInt, "block_tables");
  check_index_tensor(seq_lens, at::kInt, "seq_lens");
  check_index_tensor(query_start_loc, at::kInt, "query_start_loc");

  const int64_t num_tokens = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_blocks = key_cache.size(0), block_size = key_cache.size(1);
  const int64_t num_kv_heads = key_cache.size(2), num_seqs = seq_lens.size(0);
  TORCH_CHECK(key_cache.size(3) == head_dim, "key_cache head_dim ", key_cache.size(3),
              " differs from query head_dim ", head_dim);
  TORCH_CHECK(head_dim > 0 && head_dim <= 256 && head_dim % 8 == 0,
              "head_dim must be a multiple of 8 in [8, 256], got ", head_dim);
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads (", num_heads,
              ") must be a positive multiple of num_kv_heads (", num_kv_heads, ")");
  TORCH_CHECK(block_tables.size(0) == num_seqs, "block_tables has ", block_tables.size(0),
              " rows but seq_lens has ", num_seqs, " sequences");
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1, "query_start_loc must have num_seqs + 1 = ",
              num_seqs + 1, " entries, got ", query_start_loc.size(0));
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type() &&
                  out.is_contiguous(),
              "out must be a contiguous tensor shaped and typed like query");

  TORCH_CHECK(max_query_len <= num_tokens, "max_query_len (", max_query_len,
              ") exceeds the number of query tokens (", num_tokens, ")");
  TORCH_CHECK(max_query_len != 0 || num_tokens == 0, "max_query_len is 0 but there are ",
              num_tokens, " query tokens");
  if (max_query_len < 0) max_query_len = checked_max_query_len(
      query_start_loc, seq_lens, block_tables, num_tokens, num_blocks, block_size);

  PagedAttentionArgs a;
  a.out = out.data_ptr();
  a.query = query.data_ptr();
  a.key_cache = key_cache.data_ptr();
  a.value_cache = value_cache.data_ptr();
  a.block_tables = block_tables.data_ptr<int32_t>();
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.query_start_loc = query_start_loc.data_ptr<int32_t>();
  a.num_seqs = num_seqs;
  a.num_tokens = num_tokens;
  a.num_heads = num_heads;
  a.num_kv_heads = num_kv_heads;
  a.head_dim = head_dim;
  a.block_size = block_size;
  a.num_blocks = num_blocks;
  a.max_blocks_per_seq = block_tables.size(1);
  a.max_query_len = max_query_len;
  a.sliding_window = sliding_window > 0 ? sliding_window : 0;
  a.scale = float(scale);
  a.dtype = dtype;
  return a;
}

ReshapeAndCacheArgs reshape_and_cache_args(const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& key_cache,
                                           const at::Tensor& value_cache,
                                           const at::Tensor& slot_mapping, bool trusted) {
  check_dims(key, 3, "key", "[num_tokens, num_kv_heads, head_dim]");
  check_dims(key_cache, 4, "key_cache", "[num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(value.sizes() == key.sizes(), "value shape ", value.sizes(), " differs from key shape ",
              key.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache shape ", value_cache.sizes(),
              " differs from key_cache shape ", key_cache.sizes());
  check_dims(slot_mapping, 1, "slot_mapping", "[num_tokens]");
  for (const auto* t : {&value, &key_cache, &value_cache, &slot_mapping})
    check_same_device(*t, key, "an argument of reshape_and_cache");
  kernel_dtype(key, "key");
  for (const auto* t : {&value, &key_cache, &value_cache})
    TORCH_CHECK_TYPE(t->scalar_type() == key.scalar_type(), "key, value and both caches must share ",
                     "one dtype, got ", key.scalar_type(), " and ", t->scalar_type());
  check_contiguous(key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
  check_index_tensor(slot_mapping, at::kLong, "slot_mapping");
  TORCH_CHECK(key.size(1) == key_cache.size(2) && key.size(2) == key_cache.size(3),
              "key rows [num_kv_heads, head_dim] = ", key.sizes().slice(1),
              " do not match the cache's ", key_cache.sizes().slice(2));
  TORCH_CHECK(slot_mapping.size(0) == key.size(0), "slot_mapping has ", slot_mapping.size(0),
              " entries for ", key.size(0), " tokens");
  // A token's row may be a slice of a wider projection, but must be dense.
  for (const auto* t : {&key, &value})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == t->size(2),
                "key and value must be dense within a token (strides [*, head_dim, 1])");

  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const at::Tensor used =
      trusted ? at::Tensor() : slot_mapping.masked_select(slot_mapping >= 0);
  if (!trusted && used.numel() > 0) {
    const int64_t hi = used.max().item<int64_t>();
    TORCH_CHECK(hi < num_slots, "slot_mapping holds slot ", hi, " but the cache has ", num_slots,
                " slots");
    TORCH_CHECK(std::get<0>(at::_unique(used)).numel() == used.numel(),
                "slot_mapping writes one slot twice");
  }

  ReshapeAndCacheArgs a;
  a.key = key.data_ptr();
  a.value = value.data_ptr();
  a.key_cache = key_cache.data_ptr();
  a.value_cache = value_cache.data_ptr();
  a.slot_mapping = slot_mapping.data_ptr<int64_t>();
  a.num_tokens = key.size(0);
  a.row_numel = key.size(1) * key.size(2);
  a.key_stride = key.stride(0);
  a.value_stride = value.stride(0);
  a.elem_size = key.element_size();
  return a;
}

int64_t check_block_caches(const std::vector<at::Tensor>& caches, const char* what) {
  TORCH_CHECK(!caches.empty(), what, ": the list of caches is empty");
  const at::Tensor& first = caches[0];
  TORCH_CHECK(first.dim() >= 1 && first.size(0) > 0, what, ": caches must be [num_blocks, ...]");
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    TORCH_CHECK(c.sizes() == first.sizes() && c.scalar_type() == first.scalar_type(), what,
                ": cache ", i, " is ", c.scalar_type(), c.sizes(), " but cache 0 is ",
                first.scalar_type(), first.sizes());
    check_same_device(c, first, what);
    TORCH_CHECK(c.is_contiguous(), what, ": cache ", i, " must be contiguous");
    for (size_t j = 0; j < i; ++j)
      TORCH_CHECK(!c.is_same(caches[j]) && c.data_ptr() != caches[j].data_ptr(), what,
                  ": caches ", j, " and ", i, " are the same tensor");
  }
  return first.numel() / first.size(0) * first.element_size();
}

void check_block_ids(const at::Tensor& ids, const at::Tensor& first_cache, bool unique) {
  check_dims(ids, 1, "block_ids", "[num_ids]");
  check_same_device(ids, first_cache, "block_ids");
  check_index_tensor(ids, at::kLong, "block_ids");
  if (ids.numel() == 0) return;
  // Smallest, largest and whether two are equal, read back together: on a
  // GPU one synchronisation per call rather than one per fact.
  const at::Tensor sorted = std::get<0>(ids.sort());
  const at::Tensor repeated = ids.numel() > 1 && unique
                                  ? sorted.diff().eq(0).any().to(at::kLong)
                                  : at::zeros({}, sorted.options());
  const at::Tensor facts = at::stack({sorted[0], sorted[-1], repeated}).cpu();
  const int64_t* f = facts.data_ptr<int64_t>();
  const int64_t lo = f[0], hi = f[1];
  TORCH_CHECK(lo >= 0 && hi < first_cache.size(0), "block_ids must lie in [0, ",
              first_cache.size(0), "), got values in [", lo, ", ", hi, "]");
  TORCH_CHECK(f[2] == 0, "block_ids name one destination block twice");
}

void check_block_mapping(const at::Tensor& mapping, const at::Tensor& first_cache) {
  check_dims(mapping, 2, "block_mapping", "[num_pairs, 2]");
  TORCH_CHECK(mapping.size(1) == 2, "block_mapping must be [num_pairs, 2], got ", mapping.sizes());
  check_same_device(mapping, first_cache, "block_mapping");
  check_index_tensor(mapping, at::kLong, "block_mapping");
  if (mapping.numel() == 0) return;
  const int64_t lo = mapping.min().item<int64_t>(), hi = mapping.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < first_cache.size(0), "block_mapping must lie in [0, ",
              first_cache.size(0), "), got values in [", lo, ", ", hi, "]");
  const at::Tensor dst = mapping.select(1, 1), src = mapping.select(1, 0);
  TORCH_CHECK(std::get<0>(at::_unique(dst)).numel() == dst.numel(),
              "block_mapping names one destination block twice");
  TORCH_CHECK(!at::isin(dst, src).any().item<bool>(),
              "block_mapping uses a block both as a source and a destination");
}

void check_staging(const at::Tensor& staging, const std::vector<at::Tensor>& caches,
                   const at::Tensor& ids) {
  const at::Tensor& first = caches[0];
  TORCH_CHECK_TYPE(staging.scalar_type() == first.scalar_type(), "staging must have the caches' ",
                   "dtype ", first.scalar_type(), ", got ", staging.scalar_type());
  TORCH_CHECK(staging.is_contiguous(), "staging must be contiguous");
  const int64_t expected = ids.numel() * int64_t(caches.size()) * (first.numel() / first.size(0));
  TORCH_CHECK(staging.numel() == expected, "staging holds ", staging.numel(), " elements but ",
              ids.numel(), " blocks of ", caches.size(), " caches need ", expected);
  const bool host_pinned = first.is_cuda() && staging.is_cpu() && staging.is_pinned();
  TORCH_CHECK(staging.device() == first.device() || host_pinned, "staging is on ", staging.device(),
              " but the caches are on ", first.device(),
              " (a CPU staging buffer for CUDA caches must be pinned)");
}

}  // namespace kevlarflow
