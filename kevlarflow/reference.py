"""Pure-torch fp32 references for the native ops: slow, obvious, and the ground
truth the kernels are tested against. Nothing here is used on a serving path."""
from __future__ import annotations

import math

import torch


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Attention of each sequence's query chunk over its paged context, in fp32.

    query [num_tokens, num_heads, head_dim]; caches [num_blocks, block_size,
    num_kv_heads, head_dim]; the chunk of sequence i is query rows
    query_start_loc[i]:query_start_loc[i+1] and occupies the last positions of
    its seq_lens[i] cached tokens. Returns fp32 [num_tokens, num_heads, head_dim].
    """
    num_heads = query.shape[1]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    for i, ctx in enumerate(seq_lens.tolist()):
        q_begin, q_end = starts[i], starts[i + 1]
        n = q_end - q_begin
        if n == 0:
            continue
        blocks = block_tables[i, : math.ceil(ctx / block_size)].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, key_cache.shape[3])[:ctx].float()
        v = value_cache[blocks].reshape(-1, num_kv_heads, value_cache.shape[3])[:ctx].float()
        k = k.repeat_interleave(group, dim=1)  # [ctx, num_heads, d]
        v = v.repeat_interleave(group, dim=1)
        q = query[q_begin:q_end].float()  # [n, num_heads, d]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(ctx - n, ctx, device=query.device)[:, None]
        k_pos = torch.arange(ctx, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window > 0:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[q_begin:q_end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Write token rows into their cache slots; negative slots are skipped."""
    block_size = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = key[t]
        value_cache[slot // block_size, slot % block_size] = value[t]


def copy_blocks(caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    for src, dst in block_mapping.tolist():
        for cache in caches:
            cache[dst] = cache[src]


def pack_blocks(caches: list[torch.Tensor], block_ids: torch.Tensor) -> torch.Tensor:
    """Staging layout: [num_ids, num_caches, *block_shape], block-major."""
    ids = block_ids.long()
    return torch.stack([cache[ids] for cache in caches], dim=1)


def unpack_blocks(staging: torch.Tensor, block_ids: torch.Tensor, caches: list[torch.Tensor]) -> None:
    ids = block_ids.long()
    for c, cache in enumerate(caches):
        cache[ids] = staging[:, c].reshape(cache[ids].shape)
