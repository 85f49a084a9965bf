"""GPU benchmarks of kevlarflow's CUDA and Triton kernels against torch.

Attention: the native CUDA and the Triton paged attention against torch SDPA
over a dense GQA cache holding the same keys and values, SDPA held to its
flash kernel where that takes the case (else memory-efficient; the table says
which): decode at 1, 16 and 64 sequences, and chunked prefill. Cache ops:
pack_blocks into pinned host memory against one plain device-to-host copy_ of
the same bytes (and unpack_blocks against the host-to-device copy).

Decode rows also say how close the kernel is to the memory floor: the K/V
bytes a step must read divided by its time, as a fraction of the bandwidth of
a plain device-to-device copy_ of a large buffer measured in the same run
(bytes read plus bytes written per second).

Times come from CUDA events around `--inner` back-to-back calls; candidates
take turns, `--repeats` times, so drift hits them alike, and every figure is a
ratio to the baseline of the same turn: median (min-max) over the turns.
Attention calls go through kevlarflow.ops as the engine makes them: the
shapes checked by the bindings, the longest chunk passed in (max_query_len),
so nothing is read back from the index tensors and no call waits for the GPU.
pack_blocks and unpack_blocks are the ops direct callers reach with any block
ids: each call checks its ids (one read-back to the host) and uploads the
caches' pointers, and their times include that, which small packs feel most.
(Replication does not go through them: its packer, csrc/replication, copies
from ids the runtime made.) Run by bench/gpu/check.sh.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def time_turns(fns: dict, repeats: int, inner: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one sample per turn."""
    for fn in fns.values():  # warm-up: Triton compiles, caches fill
        fn()
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3 / inner)
    return samples


def ratio_stats(baseline: list[float], ours: list[float]) -> tuple[float, float, float]:
    """Speed against the baseline, turn by turn: (median, min, max)."""
    ratios = [b / o for b, o in zip(baseline, ours)]
    return statistics.median(ratios), min(ratios), max(ratios)


def paged_batch(chunk_lens: list[int], context: int, dtype: torch.dtype, seed: int = 0):
    """Sequences of `context` tokens whose last chunk_lens[i] are queries, in
    blocks scattered over the pool; plus the same K/V as a dense cache."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    batch = len(chunk_lens)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 16
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    value_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    ids = torch.randperm(num_blocks, generator=gen, device="cuda")[: batch * blocks_per_seq]
    block_tables = ids.view(batch, blocks_per_seq).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    starts = torch.tensor([0] + chunk_lens, device="cuda").cumsum(0).int()
    query = torch.randn(sum(chunk_lens), NUM_HEADS, HEAD_DIM, generator=gen, device="cuda")
    paged = (query.to(dtype), key_cache, value_cache, block_tables, seq_lens, starts)

    def dense(cache):  # [batch, kv heads, context, head_dim]
        rows = cache[block_tables.long()].view(batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, :context]
        return rows.transpose(1, 2).contiguous()

    return paged, dense(key_cache), dense(value_cache)


def copy_bandwidth(args, mib: int = 512) -> float:
    """Bytes per second a device-to-device copy_ moves (read plus written):
    what this GPU's memory gives a kernel that streams it."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    samples = time_turns({"copy_": lambda: dst.copy_(src)}, args.repeats, args.inner)
    return 2 * src.numel() / statistics.median(samples["copy_"])


def sdpa_baseline(call):
    """SDPA held to its flash kernel, else to its memory-efficient one, else
    as torch dispatches it: (which, a function running it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def held(backend=backend):
            with sdpa_kernel(backend):
                return call()
        try:
            held()
        except RuntimeError:  # this kernel does not take these inputs
            continue
        return name, held
    return "auto", call


def attention_case(label: str, chunk: int, batch: int, context: int, dtype, backends, args,
                   copy_bytes_per_s: float):
    from kevlarflow import ops
    from torch.nn.attention.bias import causal_lower_right

    paged, k, v = paged_batch([chunk] * batch, context, dtype)
    query = paged[0]
    q = query.view(batch, chunk, NUM_HEADS, HEAD_DIM).transpose(1, 2)
    scale = HEAD_DIM ** -0.5
    if chunk == 1:  # decode: SDPA's GQA path, no mask needed
        mask, gqa = None, True
    else:
        # A chunk's query j sits at position context - chunk + j: bottom-right
        # causal. torch's fused kernels take that mask without GQA, so the
        # baseline gets K/V expanded to every query head (prefill is compute-bound).
        mask, gqa = causal_lower_right(chunk, context), False
        k, v = (x.repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=1) for x in (k, v))

    sdpa_kind, sdpa = sdpa_baseline(
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                               enable_gqa=gqa))
    fns = {"sdpa": sdpa}
    for backend in backends:
        fns[backend] = lambda b=backend: ops.paged_attention(*paged, scale, backend=b,
                                                             max_query_len=chunk)
    expected = sdpa().transpose(1, 2).reshape(query.shape).float()
    errors = {b: (fns[b]().float() - expected).abs().max().item() for b in backends}
    samples = time_turns(fns, args.repeats, args.inner)
    dtype_name = str(dtype).removeprefix("torch.")
    # Decode must read every sequence's K and V once: its memory floor.
    kv_bytes = 2 * batch * NUM_KV_HEADS * context * HEAD_DIM * paged[1].element_size()
    rows = []
    for b in backends:
        seconds = statistics.median(samples[b])
        floor = kv_bytes / seconds / copy_bytes_per_s if chunk == 1 else None
        rows.append((label, dtype_name, context, b, seconds * 1e3, sdpa_kind,
                     statistics.median(samples["sdpa"]) * 1e3,
                     *ratio_stats(samples["sdpa"], samples[b]), floor, errors[b]))
    return rows


def pack_case(num_ids: int, caches, args):
    from kevlarflow import ops

    gen = torch.Generator(device="cuda").manual_seed(num_ids)
    ids = torch.randperm(caches[0].shape[0], generator=gen, device="cuda")[:num_ids]
    shape = ops.staging_shape(caches, num_ids)
    pinned = torch.empty(shape, dtype=caches[0].dtype, pin_memory=True)
    contiguous = torch.empty(shape, dtype=caches[0].dtype, device="cuda")
    nbytes = pinned.numel() * pinned.element_size()
    rows = []
    for op, ours, baseline in (
            ("pack->pinned", lambda: ops.pack_blocks(caches, ids, pinned),
             lambda: pinned.copy_(contiguous, non_blocking=True)),
            ("unpack<-pinned", lambda: ops.unpack_blocks(pinned, ids, caches),
             lambda: contiguous.copy_(pinned, non_blocking=True))):
        samples = time_turns({"copy_": baseline, "ours": ours}, args.repeats, args.inner)
        gbps = nbytes / statistics.median(samples["ours"]) / 1e9
        copy_gbps = nbytes / statistics.median(samples["copy_"]) / 1e9
        rows.append((op, num_ids, nbytes / 2**20, gbps, copy_gbps,
                     *ratio_stats(samples["copy_"], samples["ours"])))
    return rows


def format_tables(attention_rows, pack_rows, device: str, copy_bytes_per_s: float,
                  args) -> str:
    lines = [f"{device}; CUDA events, {args.inner} calls per sample, median (min-max) over "
             f"{args.repeats} turns; speed = baseline time / our time",
             f"of copy_: decode's K/V bytes read / time, as a fraction of a device-to-device "
             f"copy_ ({copy_bytes_per_s / 1e9:.0f} GB/s read + written)",
             "",
             f"{'case':14} {'dtype':9} {'context':>7} {'kernel':7} {'ms':>8} {'sdpa':>9} "
             f"{'sdpa ms':>8} {'speed vs sdpa':>22} {'of copy_':>8} {'max |err|':>10}"]
    for case, dtype, ctx, backend, ms, sdpa_kind, sdpa_ms, mid, lo, hi, floor, err in \
            attention_rows:
        floor_text = "-" if floor is None else f"{floor:.0%}"
        lines.append(f"{case:14} {dtype:9} {ctx:>7} {backend:7} {ms:>8.3f} {sdpa_kind:>9} "
                     f"{sdpa_ms:>8.3f} {mid:>8.2f}x ({lo:.2f}-{hi:.2f}) {floor_text:>8} "
                     f"{err:>10.2e}")
    lines += ["",
              f"{'cache op':14} {'blocks':>6} {'MiB':>7} {'GB/s':>7} {'copy_ GB/s':>10} "
              f"{'speed vs copy_':>22}"]
    for op, n, mib, gbps, copy_gbps, mid, lo, hi in pack_rows:
        lines.append(f"{op:14} {n:>6} {mib:>7.0f} {gbps:>7.1f} {copy_gbps:>10.1f} "
                     f"{mid:>8.2f}x ({lo:.2f}-{hi:.2f})")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16, 64],
                        help="sequences per decode case")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"],
                        choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--backends", nargs="+", default=["native", "triton"],
                        choices=["native", "triton"])
    parser.add_argument("--pack-blocks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=15, help="turns per candidate")
    parser.add_argument("--inner", type=int, default=10, help="calls per timed sample")
    parser.add_argument("--table", help="also write the final table to this file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs CUDA: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    import kevlarflow  # noqa: F401  (loads the extension, registers the ops)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("kevlarflow::paged_attention", "CUDA"):
        sys.exit("kevlarflow was built without CUDA kernels: build it against a CUDA torch "
                 "(bash bench/gpu/check.sh)")
    device = torch.cuda.get_device_name()
    copy_bytes_per_s = copy_bandwidth(args)
    attention_rows = []
    for dtype in (getattr(torch, d) for d in args.dtypes):
        for context in args.contexts:
            for batch in args.decode_batches:
                attention_rows += attention_case(f"decode b{batch}", 1, batch, context, dtype,
                                                 args.backends, args, copy_bytes_per_s)
        # Chunked prefill: 4 sequences each adding 512 tokens to 3584 cached ones.
        attention_rows += attention_case("prefill 4x512", 512, 4, 4096, dtype, args.backends,
                                         args, copy_bytes_per_s)
        print(f"attention {dtype} done", flush=True)
    # 64 caches (32 layers x K, V) of 2048 blocks [16, 8, 128] bf16: 4 GiB.
    caches = [torch.randn(2048, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda",
                          dtype=torch.bfloat16) for _ in range(64)]
    pack_rows = [row for n in args.pack_blocks for row in pack_case(n, caches, args)]
    table = format_tables(attention_rows, pack_rows, device, copy_bytes_per_s, args)
    print(table)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
