"""Paged attention for a mixed batch of decode and prefill-with-context chunks.

One kernel serves both kinds of sequence. A program owns one (sequence, query
tile, kv head) triple and computes every query head of that kv group at once:
its tile is BLOCK_Q query tokens x GROUP_PAD heads flattened into BLOCK_M rows,
so K and V are read once per group (GQA/MQA) and the scores are one tl.dot.
The program walks the sequence's keys BLOCK_N at a time; each key column looks
its cache block up in the block table, so any block size works and a step can
span several blocks. Softmax is online (running max and sum) in fp32.

Semantics are those of kevlarflow.reference.paged_attention. Cache slots at
positions >= seq_len (and blocks past the sequence's end in the block table)
are never loaded, so garbage or NaN there cannot reach the result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_LOG2_E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    out_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2,  # softmax scale * log2(e): the kernel exponentiates with exp2
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    SLIDING_WINDOW: tl.constexpr,  # 0: unlimited
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_begin = tl.load(query_start_loc_ptr + seq)
    chunk_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    tile_start = q_tile * BLOCK_Q
    if tile_start >= chunk_len:  # grid is sized for the longest chunk
        return

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows = tl.arange(0, BLOCK_M)
    q_in_chunk = tile_start + rows // GROUP_PAD
    head_in_group = rows % GROUP_PAD
    row_valid = (q_in_chunk < chunk_len) & (head_in_group < GROUP)
    q_pos = seq_len - chunk_len + q_in_chunk  # position of each row's token
    head = kv_head * GROUP + head_in_group

    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM

    token = (q_begin + q_in_chunk).to(tl.int64)
    q_offsets = token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(query_ptr + q_offsets, mask=q_mask, other=0.0).to(tl.float32)
    q = q * scale_log2

    # Keys this tile can see: up to its last token, back to the window start of its first.
    tile_last_pos = tl.minimum(seq_len - chunk_len + tile_start + BLOCK_Q - 1, seq_len - 1)
    kv_lo = 0
    if SLIDING_WINDOW > 0:
        kv_lo = tl.maximum(seq_len - chunk_len + tile_start - SLIDING_WINDOW + 1, 0)
    kv_hi = tile_last_pos + 1

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_offset = kv_head.to(tl.int64)
    for step_start in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
        k_pos = step_start + tl.arange(0, BLOCK_N)
        # Only slots some row of the tile may attend to are read: this keeps
        # unwritten (possibly NaN) slots and table entries out of the math.
        k_valid = (k_pos >= kv_lo) & (k_pos < kv_hi)
        block_ids = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        slots = k_pos % BLOCK_SIZE
        kv_mask = k_valid[:, None] & dim_valid[None, :]

        k_offsets = (block_ids[:, None] * stride_kb + slots[:, None] * stride_ks
                     + kv_head_offset * stride_kh + dims[None, :])
        k = tl.load(key_cache_ptr + k_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        # ieee: fp32 inputs must not be rounded to tf32 on GPU.
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N]

        allowed = row_valid[:, None] & k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if SLIDING_WINDOW > 0:
            allowed &= k_pos[None, :] > q_pos[:, None] - SLIDING_WINDOW
        scores = tl.where(allowed, scores, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A row with nothing allowed so far keeps max -inf; subtract 0 instead
        # so exp2 sees -inf - 0 = -inf (-> 0) rather than -inf - -inf = NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        correction = tl.exp2(running_max - safe_max)
        probs = tl.exp2(scores - safe_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)

        v_offsets = (block_ids[:, None] * stride_vb + slots[:, None] * stride_vs
                     + kv_head_offset * stride_vh + dims[None, :])
        v = tl.load(value_cache_ptr + v_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * correction[:, None] + tl.dot(probs, v, input_precision="ieee")
        running_max = new_max

    # Padding rows never saw a key; give them a harmless divisor (they are not stored).
    running_sum = tl.where(running_sum == 0.0, 1.0, running_sum)
    result = acc / running_sum[:, None]
    o_offsets = token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offsets, result.to(out_ptr.dtype.element_ty), mask=q_mask)


# Under TRITON_INTERPRET=1 (set before import) @triton.jit yields an
# interpreted function that runs on CPU tensors; compiled kernels need CUDA.
_INTERPRETED = not isinstance(_paged_attention_kernel, triton.runtime.JITFunction)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"paged_attention_triton: {message}")


def _validate(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out) -> None:
    _check(query.dim() == 3, f"query must be [num_tokens, num_heads, head_dim], got shape {tuple(query.shape)}")
    _check(key_cache.dim() == 4,
           f"key_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(key_cache.shape)}")
    _check(value_cache.shape == key_cache.shape,
           f"value_cache shape {tuple(value_cache.shape)} != key_cache shape {tuple(key_cache.shape)}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    _check(key_cache.shape[3] == head_dim,
           f"cache head_dim {key_cache.shape[3]} != query head_dim {head_dim}")
    _check(0 < head_dim <= _MAX_HEAD_DIM, f"head_dim must be in 1..{_MAX_HEAD_DIM}, got {head_dim}")
    _check(num_kv_heads > 0 and num_heads % num_kv_heads == 0,
           f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    _check(query.dtype in _SUPPORTED_DTYPES, f"query dtype must be one of {_SUPPORTED_DTYPES}, got {query.dtype}")
    _check(key_cache.dtype == query.dtype and value_cache.dtype == query.dtype,
           f"query, key_cache and value_cache must share a dtype, got "
           f"{query.dtype}, {key_cache.dtype}, {value_cache.dtype}")
    for name, tensor in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        _check(tensor.stride(-1) == 1, f"{name} must be contiguous in its last (head_dim) dimension")

    _check(block_tables.dim() == 2, f"block_tables must be 2-D, got shape {tuple(block_tables.shape)}")
    num_seqs = block_tables.shape[0]
    _check(seq_lens.shape == (num_seqs,), f"seq_lens must have shape ({num_seqs},), got {tuple(seq_lens.shape)}")
    _check(query_start_loc.shape == (num_seqs + 1,),
           f"query_start_loc must have shape ({num_seqs + 1},), got {tuple(query_start_loc.shape)}")
    for name, tensor in (("block_tables", block_tables), ("seq_lens", seq_lens),
                         ("query_start_loc", query_start_loc)):
        _check(tensor.dtype == torch.int32, f"{name} must be int32, got {tensor.dtype}")
    _check(block_tables.stride(-1) == 1 or block_tables.shape[1] <= 1, "block_tables rows must be contiguous")

    if out is not None:
        _check(out.shape == query.shape, f"out shape {tuple(out.shape)} != query shape {tuple(query.shape)}")
        _check(out.dtype == query.dtype, f"out dtype {out.dtype} != query dtype {query.dtype}")
        _check(out.stride(-1) == 1, "out must be contiguous in its last (head_dim) dimension")

    tensors = {"query": query, "key_cache": key_cache, "value_cache": value_cache,
               "block_tables": block_tables, "seq_lens": seq_lens, "query_start_loc": query_start_loc}
    if out is not None:
        tensors["out"] = out
    devices = {name: t.device for name, t in tensors.items()}
    _check(len(set(devices.values())) == 1, f"all tensors must be on one device, got {devices}")
    _check(_INTERPRETED or query.device.type == "cuda",
           f"tensors are on {query.device}; the compiled kernel needs CUDA "
           "(set TRITON_INTERPRET=1 before importing triton to run on CPU)")


def _validate_contents(query, key_cache, block_tables, seq_lens, query_start_loc) -> None:
    """Index contents, checked on a host copy: a bad block id would otherwise be
    an out-of-bounds read on the GPU rather than an error."""
    starts, lens = query_start_loc.cpu().long(), seq_lens.cpu().long()
    _check(starts.numel() == 0 or int(starts[0]) == 0, "query_start_loc[0] must be 0")
    _check(starts.numel() == 0 or int(starts[-1]) == query.shape[0],
           f"query_start_loc[-1] must equal the number of query tokens ({query.shape[0]})")
    chunks = starts[1:] - starts[:-1]
    _check(bool((chunks >= 0).all()), "query_start_loc must be non-decreasing")
    _check(bool((lens >= chunks).all()), "a sequence has more query tokens than its seq_len")
    block_size, num_blocks = key_cache.shape[1], key_cache.shape[0]
    needed = (lens + block_size - 1) // block_size
    _check(bool((needed <= block_tables.shape[1]).all()),
           "a sequence needs more blocks than block_tables has columns")
    table = block_tables.cpu().long()
    used = torch.arange(table.shape[1])[None, :] < needed[:, None]
    bad = used & ((table < 0) | (table >= num_blocks))
    _check(not bool(bad.any()), f"block_tables holds block ids outside the pool of {num_blocks}")


def paged_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's query chunk over its paged KV cache.

    Same arguments and semantics as kevlarflow.reference.paged_attention;
    returns (or fills ``out`` with) a tensor of query's shape and dtype.
    ``max_query_len`` bounds the chunk lengths and sizes the grid; if omitted
    it is read from query_start_loc (a device sync). A value below the real
    maximum leaves the excess query rows unwritten.

    Under the Triton CPU interpreter, bf16 is handled through fp32 casts of
    uint16 storage; tests may pass fp32 copies of bf16 data instead.
    """
    _validate(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)
    _validate_contents(query, key_cache, block_tables, seq_lens, query_start_loc)
    if out is None:
        out = torch.empty_like(query)
    num_seqs = block_tables.shape[0]
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item()) if num_seqs else 0
    _check(max_query_len >= 0, f"max_query_len must be >= 0, got {max_query_len}")
    _check(sliding_window >= 0, f"sliding_window must be >= 0, got {sliding_window}")
    if num_seqs == 0 or max_query_len == 0 or query.shape[0] == 0:
        return out

    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # Rows = query tokens x group heads; at least 16 rows so tl.dot is legal on
    # GPU, at most ~64 so a prefill tile does not spill registers.
    block_q = min(triton.next_power_of_2(max_query_len), max(1, 64 // group_pad))
    block_q = max(block_q, 16 // group_pad, 1)
    block_n = max(16, min(64, triton.next_power_of_2(block_size)))

    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        out, query, key_cache, value_cache,
        block_tables, seq_lens, query_start_loc,
        float(scale) * _LOG2_E,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        SLIDING_WINDOW=int(sliding_window),
    )
    return out
