"""Paged attention for a mixed batch of decode and prefill-with-context chunks.

Two kernels, split over the context ("flash-decoding") for every row:

1. ``_partial_kernel``: a program owns one (query tile, kv head, partition)
   triple. Its tile is BLOCK_Q query tokens of one sequence x GROUP_PAD heads
   flattened into BLOCK_M rows, so K and V are read once per group (GQA/MQA)
   and the scores are one tl.dot. Partition p holds the keys at absolute
   positions [p * PARTITION, (p + 1) * PARTITION). The program walks those of
   its keys that some row of the tile attends to, BLOCK_N at a time, with an
   online softmax in fp32, and writes each row's partial state (running max
   m, sum l, unnormalised accumulator acc) to an fp32 workspace.
2. ``_merge_kernel``: for each row, folds the partials of the partitions that
   row attends to, in ascending order, and writes the output in its dtype.

Batch invariance: a row's arithmetic never depends on the batch it is in.
The tile shape, the partition size and the key steps (aligned to absolute
positions) are fixed by the model's shapes and dtype alone, never by the
number of sequences, the chunk lengths or the longest context; the steps a
tile walks beyond a row's own keys leave that row's state unchanged bit for
bit (its scores there are -inf: the correction is 1, the probabilities 0);
and every row goes through the same merge, even a row whose keys fit in one
partition. So a token's output has the same bits alone or in any batch, and
as the last token of a prefill chunk or as a decode step.

Semantics are those of kevlarflow.reference.paged_attention. Cache slots at
positions >= seq_len (and blocks past the sequence's end in the block table)
are never loaded, so garbage or NaN there cannot reach the result; nor are
the workspace slots of partitions a row does not attend to ever read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_LOG2_E = 1.4426950408889634

# Keys per partition. Fixed (not derived from the batch) so that a row's
# arithmetic is the same in any batch. 512 gives a decode batch enough
# programs to fill a GPU at contexts of a few thousand tokens, while the fp32
# partials written per partition (head_dim + 2 floats per row) stay small next
# to the keys and values read for it.
DEFAULT_PARTITION_SIZE = 512

# Rows (query tokens x heads of a kv group) per tile. Fixed for the same
# reason: a decode step and a prefill chunk run the same compiled kernel, so
# a token's bits do not depend on which it is part of. 64 rows is one
# Hopper warpgroup MMA (wgmma, M = 64) for prefill; for decode the padding
# rows cost tensor-core cycles that the key/value loads hide.
_TILE_ROWS = 64


# Counts stay runtime i32 even when 1: Triton would otherwise make an
# argument equal to 1 a compile-time constant (a new compilation, and a
# Python int where the kernel needs a tensor).
_COUNTS = ["num_seqs", "num_tokens", "num_heads"]


@triton.jit
def _owner(query_start_loc_ptr, num_seqs, index, TILE: tl.constexpr):
    """The sequence that owns ``index``, and ``index`` relative to its first.

    TILE = 1: index is a query token; sequence i owns tokens [start_i,
    start_{i+1}). TILE = BLOCK_Q: index is a virtual query tile; sequence i
    owns tiles [start_i // TILE + i, start_{i+1} // TILE + i + 1), at least as
    many as its chunk has tiles, so num_tokens // TILE + num_seqs tiles cover
    any batch and the grid is sized without reading chunk lengths back from
    the device. The owner is the last sequence whose first index is <= index:
    counted over query_start_loc 128 entries per load (one load for up to
    128 sequences, rather than a chain of dependent loads in a binary search)."""
    SPAN: tl.constexpr = 128
    count = num_seqs * 0
    for chunk in range(0, num_seqs, SPAN):
        seqs = chunk + tl.arange(0, SPAN)
        firsts = tl.load(query_start_loc_ptr + seqs, mask=seqs < num_seqs, other=1 << 30) // TILE
        if TILE > 1:
            firsts += seqs
        count += tl.sum((firsts <= index).to(tl.int32), axis=0)
    seq = count - 1
    first = tl.load(query_start_loc_ptr + seq) // TILE
    if TILE > 1:
        first += seq
    return seq, index - first


@triton.jit(do_not_specialize=_COUNTS)
def _partial_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    part_max_ptr, part_sum_ptr, part_acc_ptr,  # fp32 workspace, [partitions, tokens, heads(, head_dim)]
    num_seqs, num_tokens, num_heads,
    scale_log2,  # softmax scale * log2(e): the kernel exponentiates with exp2
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_Q: tl.constexpr,  # query tokens per tile
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    PARTITION: tl.constexpr,  # keys per partition, a multiple of BLOCK_N
    SLIDING_WINDOW: tl.constexpr,  # 0: unlimited
    DOT_IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots (no tf32 rounding)
    DOT_UPCAST: tl.constexpr,  # interpreter: fp16/bf16 dot operands cast to fp32
):
    seq, q_tile = _owner(query_start_loc_ptr, num_seqs, tl.program_id(0), BLOCK_Q)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)

    q_begin = tl.load(query_start_loc_ptr + seq)
    chunk_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    tile_start = q_tile * BLOCK_Q
    if tile_start >= chunk_len:  # the sequence has fewer tiles than virtual tiles
        return

    # Keys this tile can see: up to its last token, back to the window start
    # of its first; of those, the ones in this partition.
    tile_first_pos = seq_len - chunk_len + tile_start
    kv_hi = tl.minimum(tile_first_pos + BLOCK_Q, seq_len)
    kv_lo = 0
    if SLIDING_WINDOW > 0:
        kv_lo = tl.maximum(tile_first_pos - SLIDING_WINDOW + 1, 0)
    kv_lo = tl.maximum(kv_lo, part * PARTITION)
    kv_hi = tl.minimum(kv_hi, (part + 1) * PARTITION)
    # Past the causal end or before the window: no row of the tile attends to
    # a key here. Nothing is written; the merge never reads these slots.
    if kv_lo >= kv_hi:
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
    # q stays in its own dtype: fp16/bf16 operands run tl.dot on tensor cores
    # with fp32 accumulation. (Loading it as fp32 forced the fp32 path, on
    # CUDA cores with "ieee" precision: the main cause of the slow prefill.)
    # The softmax scale is applied to the fp32 scores instead of to q, which
    # would round scale * q back to bf16.
    q = tl.load(query_ptr + q_offsets, mask=q_mask, other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_offset = kv_head.to(tl.int64)
    # Steps are aligned to absolute multiples of BLOCK_N (the same for every
    # tile a row may be in), so a row always meets its keys in the same groups.
    for step_start in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
        k_pos = step_start + tl.arange(0, BLOCK_N)
        # Only slots some row of the tile may attend to are read: this keeps
        # unwritten (possibly NaN) slots and table entries out of the math.
        k_valid = (k_pos >= kv_lo) & (k_pos < kv_hi)
        if BLOCK_SIZE % BLOCK_N == 0:
            # The step lies inside one cache block: its id is read once.
            block_id = tl.load(block_table + step_start // BLOCK_SIZE).to(tl.int64)
            block_ids = tl.full([BLOCK_N], 0, tl.int64) + block_id
        else:
            # Several blocks per step (or a block size that is not a power of
            # two): an id per column. The columns of one block read the same
            # word, one memory transaction per block, and the pipeliner
            # fetches the ids a stage ahead of the K/V loads they address.
            # (Loading one id per block and broadcasting it over its columns
            # took more registers when compiled for sm_90, for no fewer bytes.)
            block_ids = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        slots = k_pos % BLOCK_SIZE
        kv_mask = k_valid[:, None] & dim_valid[None, :]

        k_offsets = (block_ids[:, None] * stride_kb + slots[:, None] * stride_ks
                     + kv_head_offset * stride_kh + dims[None, :])
        k = tl.load(key_cache_ptr + k_offsets, mask=kv_mask, other=0.0)
        if DOT_UPCAST:
            k = k.to(tl.float32)
        if DOT_IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * scale_log2

        allowed = row_valid[:, None] & k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if SLIDING_WINDOW > 0:
            allowed &= k_pos[None, :] > q_pos[:, None] - SLIDING_WINDOW
        scores = tl.where(allowed, scores, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A row with nothing allowed so far keeps max -inf; subtract 0 instead
        # so exp2 sees -inf - 0 = -inf (-> 0) rather than -inf - -inf = NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        # An unchanged max gives exactly 1 (not whatever exp2(0) rounds to): a
        # step with none of a row's keys must leave that row's state as it was.
        correction = tl.where(running_max == new_max, 1.0, tl.exp2(running_max - safe_max))
        probs = tl.exp2(scores - safe_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)

        v_offsets = (block_ids[:, None] * stride_vb + slots[:, None] * stride_vs
                     + kv_head_offset * stride_vh + dims[None, :])
        v = tl.load(value_cache_ptr + v_offsets, mask=kv_mask, other=0.0)
        # The probabilities meet V in V's dtype, as in flash attention: a
        # tensor-core dot for fp16/bf16, fp32 accumulation either way.
        probs_v = probs.to(v.dtype)
        if DOT_UPCAST:
            probs_v = probs_v.to(tl.float32)
            v = v.to(tl.float32)
        if DOT_IEEE:
            acc = acc * correction[:, None] + tl.dot(probs_v, v, input_precision="ieee")
        else:
            acc = acc * correction[:, None] + tl.dot(probs_v, v)
        running_max = new_max

    # Rows with no key in this partition store m = -inf, l = 0, acc = 0;
    # the merge reads a row's partials only for partitions holding its keys.
    # int64: partitions x tokens x heads x head_dim can pass 2**31.
    state = (num_tokens.to(tl.int64) * part + token) * num_heads + head
    tl.store(part_max_ptr + state, running_max, mask=row_valid)
    tl.store(part_sum_ptr + state, running_sum, mask=row_valid)
    tl.store(part_acc_ptr + state[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)


@triton.jit(do_not_specialize=_COUNTS)
def _merge_kernel(
    out_ptr, seq_lens_ptr, query_start_loc_ptr,
    part_max_ptr, part_sum_ptr, part_acc_ptr,
    num_seqs, num_tokens, num_heads,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # heads per program, a power of two
    BLOCK_D: tl.constexpr,
    PARTITION: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
):
    # One program per query token and BLOCK_H of its heads: [BLOCK_H,
    # BLOCK_D] values, whose partials lie contiguous in the workspace.
    # Everything here is elementwise per row, so the shape of this tile does
    # not touch a row's bits.
    token = tl.program_id(0)
    seq, q_in_chunk = _owner(query_start_loc_ptr, num_seqs, token, 1)
    chunk_len = tl.load(query_start_loc_ptr + seq + 1) - tl.load(query_start_loc_ptr + seq)
    if q_in_chunk >= chunk_len:  # a query row past the last chunk: no sequence's
        return
    q_pos = tl.load(seq_lens_ptr + seq) - chunk_len + q_in_chunk

    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_valid = head < num_heads
    dims = tl.arange(0, BLOCK_D)
    mask = head_valid[:, None] & (dims < HEAD_DIM)[None, :]

    # This token's own partitions, from its window start to its position:
    # the partial kernel wrote all of them, and no other slot is read.
    first_part = 0
    if SLIDING_WINDOW > 0:
        first_part = tl.maximum(q_pos - SLIDING_WINDOW + 1, 0) // PARTITION
    last_part = q_pos // PARTITION

    # Ascending partition order: m = max m_p, then l = sum l_p * 2^(m_p - m)
    # and acc likewise.
    merged_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for part in range(first_part, last_part + 1):
        state = (num_tokens.to(tl.int64) * part + token) * num_heads + head
        merged_max = tl.maximum(merged_max, tl.load(part_max_ptr + state, mask=head_valid, other=0.0))
    merged_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for part in range(first_part, last_part + 1):
        state = (num_tokens.to(tl.int64) * part + token) * num_heads + head
        part_max = tl.load(part_max_ptr + state, mask=head_valid, other=0.0)
        part_sum = tl.load(part_sum_ptr + state, mask=head_valid, other=0.0)
        part_acc = tl.load(part_acc_ptr + state[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
        # Exactly 1 for the partition holding the max (so a token whose keys
        # fit in one partition comes out as acc / l). Every partition read
        # holds one of the token's keys, so m_p is finite and nothing is NaN.
        weight = tl.where(part_max == merged_max, 1.0, tl.exp2(part_max - merged_max))
        merged_sum += part_sum * weight
        acc += part_acc * weight[:, None]

    # Padding heads merged nothing; a harmless divisor (they are not stored).
    merged_sum = tl.where(head_valid, merged_sum, 1.0)
    result = acc / merged_sum[:, None]
    o_offsets = token.to(tl.int64) * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


# Under TRITON_INTERPRET=1 (set before import) @triton.jit yields an
# interpreted function that runs on CPU tensors; compiled kernels need CUDA.
_INTERPRETED = not isinstance(_partial_kernel, triton.runtime.JITFunction)


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


def _tile_config(group: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile shape and launch options: a function of the model's shapes and
    dtype only, never of the batch (see the module docstring).

    Checked by compiling for sm_90 without a GPU, at the GPU benchmark's
    shapes (bf16, GQA 32/8, head_dim 128, block 16): both dots are wgmma, the
    K/V loads cp.async double-buffered, and nothing spills inside the key
    loop."""
    group_pad = triton.next_power_of_2(group)
    # At least 16: the K dimension of a tensor-core dot (masked past head_dim).
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        # Exact fp32 dots run on CUDA cores and hold their operands in
        # registers: narrower steps and more warps keep the spills small.
        # This is the accuracy path, not a fast one.
        block_n, num_warps, num_stages = 32, 8, 2
    else:
        # 64 keys per step (the old kernel stepped one cache block, 16 keys,
        # at a time: dots too thin for tensor cores and four times the loop
        # overhead); 32 at head_dim 256 to stay within the register file.
        # One warpgroup (4 warps) owns all 64 rows: the probabilities go from
        # the QK^T accumulator into the PV wgmma in registers, with no layout
        # conversion through shared memory, which 8 warps needed. 3 stages:
        # the block ids a step ahead of the K/V loads they address.
        block_n, num_warps, num_stages = (64 if block_d <= 128 else 32), 4, 3
    return dict(GROUP_PAD=group_pad, BLOCK_Q=max(1, _TILE_ROWS // group_pad), BLOCK_D=block_d,
                BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _allocate_workspace(num_partitions: int, num_tokens: int, num_heads: int, head_dim: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 partial max, sum and accumulator of every (partition, token, head).
    Left uninitialised: only slots the partial kernel wrote are ever read."""
    states = (num_partitions, num_tokens, num_heads)
    return (torch.empty(states, dtype=torch.float32, device=device),
            torch.empty(states, dtype=torch.float32, device=device),
            torch.empty((*states, head_dim), dtype=torch.float32, device=device))


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
    partition_size: int = DEFAULT_PARTITION_SIZE,
) -> torch.Tensor:
    """Attention of each sequence's query chunk over its paged KV cache.

    Same arguments and semantics as kevlarflow.reference.paged_attention;
    returns (or fills ``out`` with) a tensor of query's shape and dtype.

    ``max_query_len``: the longest chunk, from a caller that built the batch
    and vouches for the index tensors' contents (the engine): then nothing is
    read back from them, so there is no device synchronisation. None: their
    contents are checked on a host copy, and a bad one raises. The grid does
    not depend on it (it is sized from the number of tokens).

    ``partition_size``: keys per context partition, a multiple of 64. A
    token's output has the same bits in any batch for a given partition size;
    changing it changes the rounding. The workspace holds
    cdiv(block_tables.shape[1] * block_size, partition_size) x num_tokens x
    num_heads x (head_dim + 2) floats.

    Under the Triton CPU interpreter, fp16/bf16 dot operands are cast to fp32
    (the interpreter's dot cannot take bf16), after the same roundings the
    GPU path makes.
    """
    _validate(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)
    if max_query_len is None:
        _validate_contents(query, key_cache, block_tables, seq_lens, query_start_loc)
    _check(max_query_len is None or max_query_len >= 0, f"max_query_len must be >= 0, got {max_query_len}")
    _check(sliding_window >= 0, f"sliding_window must be >= 0, got {sliding_window}")
    _check(partition_size > 0 and partition_size % 64 == 0,
           f"partition_size must be a positive multiple of 64, got {partition_size}")
    if out is None:
        out = torch.empty_like(query)
    num_seqs, num_tokens = block_tables.shape[0], query.shape[0]
    if num_seqs == 0 or num_tokens == 0 or max_query_len == 0:
        return out

    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    config = _tile_config(group, head_dim, query.dtype)
    block_q = config["BLOCK_Q"]
    # Every partition a sequence can have: the block table bounds its length.
    num_partitions = max(1, triton.cdiv(block_tables.shape[1] * block_size, partition_size))
    part_max, part_sum, part_acc = _allocate_workspace(num_partitions, num_tokens, num_heads,
                                                       head_dim, query.device)
    # Virtual query tiles (see _owner): no chunk length is read back.
    num_tiles = num_tokens // block_q + num_seqs

    _partial_kernel[(num_tiles, num_kv_heads, num_partitions)](
        query, key_cache, value_cache,
        block_tables, seq_lens, query_start_loc,
        part_max, part_sum, part_acc,
        num_seqs, num_tokens, num_heads,
        float(scale) * _LOG2_E,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        BLOCK_N=config["BLOCK_N"],
        DOT_IEEE=query.dtype == torch.float32,
        DOT_UPCAST=_INTERPRETED and query.dtype != torch.float32,
        HEAD_DIM=head_dim, GROUP=group, GROUP_PAD=config["GROUP_PAD"], BLOCK_Q=block_q,
        BLOCK_D=config["BLOCK_D"], PARTITION=partition_size, SLIDING_WINDOW=int(sliding_window),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    # Up to 4096 values a program (32 a thread at 4 warps).
    block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // config["BLOCK_D"]))
    _merge_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        out, seq_lens, query_start_loc,
        part_max, part_sum, part_acc,
        num_seqs, num_tokens, num_heads,
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=config["BLOCK_D"],
        PARTITION=partition_size, SLIDING_WINDOW=int(sliding_window),
        num_warps=max(1, block_h * config["BLOCK_D"] // 1024),
    )
    return out
