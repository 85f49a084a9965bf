"""The two Triton kernels of paged attention split over the context
(launched by paged_attention.py, which says what they compute):

1. ``partial_kernel``: a program owns one (query tile, kv head, partition)
   triple. Its tile is BLOCK_Q query tokens of one sequence x GROUP_PAD heads
   flattened into BLOCK_M rows, so K and V are read once per group (GQA/MQA)
   and the scores are one tl.dot. Partition p holds the keys at absolute
   positions [p * PARTITION, (p + 1) * PARTITION). The program walks those of
   its keys that some row of the tile attends to, BLOCK_N at a time, with an
   online softmax in fp32, and writes each row's partial state (running max
   m, sum l, unnormalised accumulator acc) to an fp32 workspace.
2. ``merge_kernel``: for each row, folds the partials of the partitions that
   row attends to, in ascending order, and writes the output in its dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl


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


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, ROWWISE: tl.constexpr):
    """a @ b, accumulated in fp32. ROWWISE (the CPU interpreter) forms the
    fp32 products and sums them along K, each row by itself: the
    interpreter's tl.dot is the host BLAS's matmul, which can round a row
    differently by its place in the matrix (OpenBLAS's Haswell sgemm does,
    its AVX-512 one does not), where a GPU's MMA does not. Bit-for-bit
    tests of batch invariance run on the CPU through this path."""
    if ROWWISE:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit(do_not_specialize=_COUNTS)
def partial_kernel(
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
    DOT_ROWWISE: tl.constexpr,  # the CPU interpreter: see _dot
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
        scores = _dot(q, tl.trans(k), DOT_IEEE, DOT_ROWWISE) * scale_log2  # [BLOCK_M, BLOCK_N]

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
        acc = acc * correction[:, None] + _dot(probs.to(v.dtype), v, DOT_IEEE, DOT_ROWWISE)
        running_max = new_max

    # Rows with no key in this partition store m = -inf, l = 0, acc = 0;
    # the merge reads a row's partials only for partitions holding its keys.
    # int64: partitions x tokens x heads x head_dim can pass 2**31.
    state = (num_tokens.to(tl.int64) * part + token) * num_heads + head
    tl.store(part_max_ptr + state, running_max, mask=row_valid)
    tl.store(part_sum_ptr + state, running_sum, mask=row_valid)
    tl.store(part_acc_ptr + state[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)


@triton.jit(do_not_specialize=_COUNTS)
def merge_kernel(
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
