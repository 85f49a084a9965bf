"""CPU paged attention against the obvious torch alternative: gather each
sequence's blocks into a dense cache, then scaled_dot_product_attention."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kevlarflow import _C, ops
from kevlarflow.bench.timing import cpu_model, interleaved


def random_decode_batch(batch: int, context: int, num_heads: int, num_kv_heads: int,
                        head_dim: int, block_size: int, dtype: torch.dtype, seed: int = 0):
    """A decode batch (one query token per sequence) over scattered blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 16
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq]
    block_tables = table.view(batch, blocks_per_seq).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    query = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    return query, key_cache, value_cache, block_tables, seq_lens, query_start_loc


def gather_sdpa(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale):
    """The torch reference for an equal-length decode batch."""
    batch, context = seq_lens.numel(), int(seq_lens[0])
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    ids = block_tables.long()
    k = key_cache[ids].view(batch, -1, num_kv_heads, head_dim)[:, :context].transpose(1, 2)
    v = value_cache[ids].view(batch, -1, num_kv_heads, head_dim)[:, :context].transpose(1, 2)
    q = query.unsqueeze(2)  # [batch, heads, 1, head_dim]
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True).squeeze(2)


def run(contexts=(1024, 4096), dtypes=(torch.float32, torch.bfloat16), batch=32,
        num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, repeats=7):
    rows = []
    for dtype in dtypes:
        for context in contexts:
            args = random_decode_batch(batch, context, num_heads, num_kv_heads, head_dim,
                                       block_size, dtype)
            scale = head_dim ** -0.5
            out = ops.paged_attention(*args, scale)
            ref = gather_sdpa(*args, scale)
            err = (out.float() - ref.float()).abs().max().item()
            timings = interleaved({
                "kevlarflow": lambda: ops.paged_attention(*args, scale),
                "gather+sdpa": lambda: gather_sdpa(*args, scale),
            }, repeats=repeats)
            ours, base = timings["kevlarflow"], timings["gather+sdpa"]
            ratios = sorted(b / o for b, o in zip(base.samples, ours.samples))
            rows.append((str(dtype).removeprefix("torch."), context, ours, base, ratios, err))
    return rows


def format_table(rows) -> str:
    lines = [f"decode batch 32, 32 q heads / 8 kv heads, head_dim 128, block 16; "
             f"{torch.get_num_threads()} threads, {cpu_model()}, {_C.cpu_attention_isa()} kernel",
             f"{'dtype':9} {'context':>7} {'kevlarflow ms':>14} {'gather+sdpa ms':>15} "
             f"{'speedup (median, min-max)':>26} {'max |err|':>10}"]
    for dtype, context, ours, base, ratios, err in rows:
        mid = ratios[len(ratios) // 2]
        lines.append(f"{dtype:9} {context:>7} {ours.median * 1e3:>14.2f} {base.median * 1e3:>15.2f} "
                     f"{mid:>11.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}) {err:>10.2e}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rows = run(tuple(args.contexts), tuple(getattr(torch, d) for d in args.dtypes),
               repeats=args.repeats)
    print(format_table(rows))


if __name__ == "__main__":
    main()
