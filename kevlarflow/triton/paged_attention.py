"""Paged attention for a mixed batch of decode and prefill-with-context chunks,
in Triton: split over the context ("flash-decoding") for every row, a
partial kernel per (query tile, kv head, partition of keys) and a merge
kernel per row (attention_kernels.py). This module checks the arguments,
sizes the tiles and the workspace, and launches them.

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

from kevlarflow.triton.attention_kernels import merge_kernel, partial_kernel

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


# Under TRITON_INTERPRET=1 (set before import) @triton.jit yields an
# interpreted function that runs on CPU tensors; compiled kernels need CUDA.
_INTERPRETED = not isinstance(partial_kernel, triton.runtime.JITFunction)


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

    Under the Triton CPU interpreter, the dots are fp32 products summed per
    row (attention_kernels._dot says why), after the same roundings of their
    operands (fp16/bf16 probabilities) that the GPU path makes.
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
    # Virtual query tiles (see attention_kernels._owner): no chunk length is read back.
    num_tiles = num_tokens // block_q + num_seqs

    partial_kernel[(num_tiles, num_kv_heads, num_partitions)](
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
        DOT_ROWWISE=_INTERPRETED,
        HEAD_DIM=head_dim, GROUP=group, GROUP_PAD=config["GROUP_PAD"], BLOCK_Q=block_q,
        BLOCK_D=config["BLOCK_D"], PARTITION=partition_size, SLIDING_WINDOW=int(sliding_window),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    # Up to 4096 values a program (32 a thread at 4 warps).
    block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // config["BLOCK_D"]))
    merge_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        out, seq_lens, query_start_loc,
        part_max, part_sum, part_acc,
        num_seqs, num_tokens, num_heads,
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=config["BLOCK_D"],
        PARTITION=partition_size, SLIDING_WINDOW=int(sliding_window),
        num_warps=max(1, block_h * config["BLOCK_D"] // 1024),
    )
    return out
