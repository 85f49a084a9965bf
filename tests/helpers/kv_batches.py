"""Random paged-KV batches for kernel tests: scattered block tables, and every
cache slot a sequence does not own filled with NaN, so that a kernel reading
past a sequence's length poisons its output instead of passing by luck."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float

    def args(self):
        return (self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens,
                self.query_start_loc, self.scale)


def make_batch(context_lens: list[int], chunk_lens: list[int], num_heads: int, num_kv_heads: int,
               head_dim: int, block_size: int, dtype=torch.float32, seed: int = 0,
               num_blocks: int | None = None, use_top_blocks: bool = False) -> Batch:
    """Sequence i has context_lens[i] cached tokens, the last chunk_lens[i] of
    which are its query chunk. The pool has num_blocks blocks (default: what is
    needed plus spare); use_top_blocks takes the ids from the end of the pool,
    so that byte offsets of a huge pool exceed 32 bits."""
    assert all(0 <= n <= c for n, c in zip(chunk_lens, context_lens))
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(c / block_size) for c in context_lens]
    total = sum(needed)
    num_blocks = num_blocks or total + 7
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # torch.empty does not touch memory: a huge pool costs only the blocks used.
    key_cache = torch.empty(shape, dtype=dtype)
    value_cache = torch.empty(shape, dtype=dtype)
    if use_top_blocks:
        ids = num_blocks - 1 - torch.randperm(total, generator=gen)
    else:
        ids = torch.randperm(num_blocks, generator=gen)[:total]
        key_cache.fill_(float("nan"))
        value_cache.fill_(float("nan"))
    max_blocks = max(needed + [1]) + 2
    block_tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    offset = 0
    for i, (ctx, n_blocks) in enumerate(zip(context_lens, needed)):
        seq_ids = ids[offset:offset + n_blocks]
        offset += n_blocks
        block_tables[i, :n_blocks] = seq_ids.int()
        for cache in (key_cache, value_cache):
            data = torch.full((n_blocks * block_size, num_kv_heads, head_dim), float("nan"))
            data[:ctx] = torch.randn(ctx, num_kv_heads, head_dim, generator=gen)
            cache[seq_ids] = data.view(n_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    starts = [0]
    for n in chunk_lens:
        starts.append(starts[-1] + n)
    query = torch.randn(starts[-1], num_heads, head_dim, generator=gen).to(dtype)
    return Batch(query, key_cache, value_cache, block_tables,
                 torch.tensor(context_lens, dtype=torch.int32),
                 torch.tensor(starts, dtype=torch.int32), head_dim ** -0.5)


TOLERANCES = {  # (atol, rtol) against the fp32 reference on the same rounded inputs
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
