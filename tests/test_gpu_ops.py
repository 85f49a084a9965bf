"""CUDA kernels against the reference. Marked gpu: skipped without CUDA."""
import math

import pytest
import torch

from kevlarflow import ops, reference
from helpers.kv_batches import TOLERANCES, Batch, make_batch

pytestmark = pytest.mark.gpu

# Keys per partition of the CUDA kernel (kPartitionKeys in paged_attention_cuda.cu):
# the cases below put contexts, chunks and window starts on both sides of its
# multiples.
PARTITION = 512


def to_cuda(batch):
    for name in ("query", "key_cache", "value_cache", "block_tables", "seq_lens",
                 "query_start_loc"):
        setattr(batch, name, getattr(batch, name).cuda())
    return batch


def bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}[t.dtype])


def assert_same_bits(a, b, what):
    assert torch.equal(bits(a), bits(b)), f"{what}: the bits differ"


def longest_chunk(batch):
    return int((batch.query_start_loc[1:] - batch.query_start_loc[:-1]).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("window", [0, 50])
def test_cuda_paged_attention(dtype, head_dim, block_size, window):
    batch = to_cuda(make_batch([1, 37, 64, 90, 16, 700], [1, 37, 1, 13, 0, 200], 8, 2, head_dim,
                               block_size, dtype=dtype, seed=head_dim))
    out = ops.paged_attention(*batch.args(), sliding_window=window)
    expected = reference.paged_attention(*batch.args(), sliding_window=window)
    assert torch.isfinite(out).all()
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_decode_matches_cpu_kernel(backend):
    batch = make_batch([2048, 100, 1], [1, 1, 1], 32, 8, 128, 16, dtype=torch.float32)
    cpu = ops.paged_attention(*batch.args())
    gpu = ops.paged_attention(*to_cuda(batch).args(), backend=backend)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-5, rtol=1e-4)


def test_cuda_cache_ops_bit_exact():
    caches = [torch.randn(50, 16, 2, 64, device="cuda").to(torch.bfloat16) for _ in range(4)]
    ids = torch.tensor([3, 49, 0, 17], device="cuda")
    staging = ops.pack_blocks(caches, ids)
    assert torch.equal(staging, reference.pack_blocks(caches, ids))
    pinned = torch.empty(staging.shape, dtype=staging.dtype, pin_memory=True)
    ops.pack_blocks(caches, ids, pinned)  # gathered on the device, then copied to the host
    torch.cuda.synchronize()
    assert torch.equal(pinned, staging.cpu())
    other = [torch.zeros_like(c) for c in caches]
    ops.unpack_blocks(pinned, ids, other)
    torch.cuda.synchronize()
    assert all(torch.equal(o[ids], c[ids]) for o, c in zip(other, caches))
    mapping = torch.tensor([[3, 4], [49, 5]], device="cuda")
    expected = [c.clone() for c in caches]
    reference.copy_blocks(expected, mapping)
    ops.copy_blocks(caches, mapping)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected))
    key = torch.randn(5, 2, 64, device="cuda").to(torch.bfloat16)
    slots = torch.tensor([0, -1, 799, 33, 2], device="cuda")
    kc, vc = caches[0].clone(), caches[1].clone()
    ek, ev = kc.clone(), vc.clone()
    reference.reshape_and_cache(key, key, ek, ev, slots)
    ops.reshape_and_cache(key, key, kc, vc, slots)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


def test_cuda_rejects_mixed_devices():
    batch = to_cuda(make_batch([20, 9], [1, 9], 4, 2, 64, 8))
    with pytest.raises(RuntimeError, match="is on cpu"):
        ops.paged_attention(batch.query, batch.key_cache, batch.value_cache,
                            batch.block_tables.cpu(), batch.seq_lens, batch.query_start_loc,
                            batch.scale)
    caches = [torch.zeros(4, 8, 2, 16, device="cuda")]
    with pytest.raises(RuntimeError, match="must be pinned"):
        ops.pack_blocks(caches, torch.tensor([1], device="cuda"), torch.empty(1, 1, 8, 2, 16))


# Decodes just below, at and past a partition's end; a 100-token chunk across
# the boundary at 1024; a decode three partitions in; a 600-token chunk over
# partitions 2-4. Contexts end mid-block for every block size below, and the
# slots past each context hold NaN.
PARTITION_CONTEXTS = [1, 511, 512, 513, 1100, 1537, 2100]
PARTITION_CHUNKS = [1, 1, 1, 1, 100, 1, 600]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 24, 32])
@pytest.mark.parametrize("window", [0, 300, 1000])
def test_cuda_paged_attention_across_partitions(dtype, block_size, window):
    """Split over the context: parity with the reference and with the CPU
    kernel for contexts of several partitions, windows that start in the
    middle of one (300, 1000), and block sizes that do not divide it (24)."""
    cpu_batch = make_batch(PARTITION_CONTEXTS, PARTITION_CHUNKS, 8, 2, 64, block_size,
                           dtype=dtype, seed=block_size)
    assert torch.isnan(cpu_batch.key_cache).any() and torch.isnan(cpu_batch.value_cache).any()
    cpu = ops.paged_attention(*cpu_batch.args(), sliding_window=window)
    batch = to_cuda(cpu_batch)
    out = ops.paged_attention(*batch.args(), sliding_window=window)
    assert torch.isfinite(out).all(), "a NaN from a slot past a context reached the output"
    expected = reference.paged_attention(*batch.args(), sliding_window=window)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), cpu, atol=2e-5, rtol=1e-4)
    # The engine's path: nothing read back, the grid sized by the caller's
    # longest chunk, or by a larger bound: the same bits either way.
    trusted = ops.paged_attention(*batch.args(), sliding_window=window,
                                  max_query_len=longest_chunk(batch))
    assert_same_bits(trusted, out, "trusted path")
    wide = ops.paged_attention(*batch.args(), sliding_window=window,
                               max_query_len=batch.query.shape[0])
    assert_same_bits(wide, out, "a grid sized for a longer chunk")


def test_cuda_never_reads_past_a_context():
    """Every slot a sequence does not own is NaN, K and V alike, including the
    rest of its last block and whole blocks of the table past its context."""
    cpu_batch = make_batch([513, 1024, 1025, 40], [1, 1, 300, 40], 32, 8, 128, 16,
                           dtype=torch.bfloat16, seed=7)
    batch = to_cuda(cpu_batch)
    # The table's spare columns point at a real block of the pool, full of NaN.
    spare = batch.block_tables < 0
    unused = torch.ones(batch.key_cache.shape[0], dtype=torch.bool, device="cuda")
    unused[batch.block_tables[~spare].long()] = False
    assert torch.isnan(batch.key_cache[unused]).all() and torch.isnan(batch.value_cache[unused]).all()
    batch.block_tables[spare] = int(unused.nonzero()[0])
    for window in (0, 100):
        out = ops.paged_attention(*batch.args(), sliding_window=window,
                                  max_query_len=longest_chunk(batch))
        assert torch.isfinite(out).all()
        expected = reference.paged_attention(*batch.args(), sliding_window=window)
        torch.testing.assert_close(out.float(), expected, atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.parametrize("dtype,group,window", [(torch.float32, 4, 0), (torch.bfloat16, 4, 700),
                                                (torch.float32, 3, 0), (torch.float16, 8, 300)])
def test_cuda_token_result_independent_of_batch_and_chunking(dtype, group, window):
    """A token's output has the same bits alone (a decode step), as the last
    token of a prefill chunk, inside a longer chunk, and among other sequences,
    for positions on both sides of a partition boundary (1024): recomputing
    lost KV after a failure must not change what is generated."""
    context, chunk = 1100, 100  # positions 1000 .. 1099
    batch = to_cuda(make_batch([context], [chunk], 2 * group, 2, 64, 16, dtype=dtype, seed=3))
    in_chunk = ops.paged_attention(*batch.args(), sliding_window=window)
    others = to_cuda(make_batch([50, 620], [1, 30], 2 * group, 2, 64, 16, dtype=dtype, seed=4))
    n = batch.key_cache.shape[0]
    kc = torch.cat([batch.key_cache, others.key_cache])
    vc = torch.cat([batch.value_cache, others.value_cache])
    width = others.block_tables.shape[1] + batch.block_tables.shape[1]
    tables = torch.zeros((3, width), dtype=torch.int32, device="cuda")
    tables[0, :batch.block_tables.shape[1]] = batch.block_tables[0]
    tables[1:, :others.block_tables.shape[1]] = others.block_tables + n
    tables = tables[[1, 0, 2]].contiguous()

    def ints(values):
        return torch.tensor(values, dtype=torch.int32, device="cuda")

    for j in (0, 22, 23, 24, 25, 60, 99):
        pos_len = context - chunk + j + 1
        alone = ops.paged_attention(batch.query[j:j + 1], batch.key_cache, batch.value_cache,
                                    batch.block_tables, ints([pos_len]), ints([0, 1]),
                                    batch.scale, sliding_window=window)
        assert_same_bits(alone[0], in_chunk[j], f"token {j} alone")
        # Chunks of 2, 4 and 7 tokens: the kernel's rows-per-block variants.
        for first in sorted({max(0, j - back) for back in (1, 3, 6)}):
            as_last = ops.paged_attention(batch.query[first:j + 1], batch.key_cache,
                                          batch.value_cache, batch.block_tables, ints([pos_len]),
                                          ints([0, j + 1 - first]), batch.scale,
                                          sliding_window=window)
            assert_same_bits(as_last[-1], in_chunk[j],
                             f"token {j} as the last of a chunk of {j + 1 - first}")
        query = torch.cat([others.query[:1], batch.query[j:j + 1], others.query[1:]])
        mixed = ops.paged_attention(query, kc, vc, tables, ints([50, pos_len, 620]),
                                    ints([0, 1, 2, 32]), batch.scale, sliding_window=window,
                                    max_query_len=30)
        assert_same_bits(mixed[1], in_chunk[j], f"token {j} among other sequences")


def test_cuda_long_prefill_runs_in_several_launches_with_the_same_bits():
    """A 4096-token chunk of 32 heads over 8 or more partitions needs more workspace
    than one call takes (256 MiB), so it runs as several launches over token
    ranges: it must still match the reference, and its last tokens must have
    the bits they get in a short chunk that needs a single launch."""
    context = 4096
    batch = to_cuda(make_batch([context], [context], 32, 8, 128, 16, dtype=torch.bfloat16,
                               seed=11))
    per_token = 32 * math.ceil(context / PARTITION) * (128 + 2) * 4
    assert context * per_token > 256 << 20
    out = ops.paged_attention(*batch.args(), max_query_len=context)
    assert torch.isfinite(out).all()
    expected = reference.paged_attention(*batch.args())
    torch.testing.assert_close(out.float(), expected, atol=1.6e-2, rtol=1.6e-2)
    tail = ops.paged_attention(batch.query[-16:], batch.key_cache, batch.value_cache,
                               batch.block_tables, batch.seq_lens,
                               torch.tensor([0, 16], dtype=torch.int32, device="cuda"),
                               batch.scale)
    assert_same_bits(tail, out[-16:], "the last tokens of a long chunk")


def test_cuda_pool_larger_than_32_bit_offsets():
    """Blocks near the top of a pool of more than 2^31 elements: any 32-bit
    offset arithmetic reads elsewhere. The pool is built on the GPU; only the
    blocks in use are copied in."""
    num_blocks = 140_000
    assert num_blocks * 16 * 8 * 128 > 2**31
    small = make_batch([1100, 1, 40], [1, 1, 40], 32, 8, 128, 16, dtype=torch.bfloat16, seed=5)
    used = small.block_tables[small.block_tables >= 0].long()
    top = num_blocks - 1 - torch.arange(used.numel())
    remap = torch.full((small.key_cache.shape[0],), -1, dtype=torch.long)
    remap[used] = top
    tables = torch.where(small.block_tables >= 0, remap[small.block_tables.clamp(min=0).long()],
                         -1).int()
    shape = (num_blocks, *small.key_cache.shape[1:])
    key_cache = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    value_cache = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    key_cache[top.cuda()] = small.key_cache[used].cuda()
    value_cache[top.cuda()] = small.value_cache[used].cuda()
    assert int(tables.max()) * 16 * 8 * 128 > 2**31
    batch = Batch(small.query.cuda(), key_cache, value_cache, tables.cuda(),
                  small.seq_lens.cuda(), small.query_start_loc.cuda(), small.scale)
    out = ops.paged_attention(*batch.args())
    expected = reference.paged_attention(*small.args())
    torch.testing.assert_close(out.float().cpu(), expected, atol=1.6e-2, rtol=1.6e-2)
