"""paged_attention_triton against the fp32 torch reference.

Without CUDA the kernel runs under the Triton CPU interpreter, which is slow:
sizes here are small on purpose. Cache slots that no sequence owns, and slots
past each sequence's length, hold NaN, so any stray read shows up in the output.
"""
import functools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first @triton.jit: the decorator reads it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kevlarflow.reference import paged_attention  # noqa: E402
from kevlarflow.triton import paged_attention as triton_module  # noqa: E402
from kevlarflow.triton import paged_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {  # (atol, rtol): the kernel computes in fp32; the rest is output rounding
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

# (seq_len, chunk_len): chunk_len 1 is decode, chunk_len == seq_len is a fresh
# prefill, anything between is a prefill chunk on top of cached context.
MIXED_BATCH = [(37, 1), (1, 1), (50, 13), (23, 23), (32, 1), (10, 0), (70, 6)]


def make_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype,
               seed=0, device=DEVICE, spare_blocks=7):
    """Random query and a scattered paged cache: NaN wherever no token lives."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(seq_len / block_size) for seq_len, _ in seqs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    pool_order = torch.randperm(num_blocks, generator=gen)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(cache_shape, float("nan"))
    value_cache = torch.full(cache_shape, float("nan"))

    # Table entries past a sequence's end point at a NaN block, never -1:
    # a kernel that reads them then fails loudly instead of faulting.
    nan_block = pool_order[-1].item()
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.full((len(seqs), max_blocks), nan_block, dtype=torch.int32)
    next_free = 0
    for i, ((seq_len, _), count) in enumerate(zip(seqs, blocks_per_seq)):
        ids = pool_order[next_free:next_free + count]
        next_free += count
        block_tables[i, :count] = ids.to(torch.int32)
        for pos in range(seq_len):
            block, slot = ids[pos // block_size], pos % block_size
            key_cache[block, slot] = torch.randn(num_kv_heads, head_dim, generator=gen)
            value_cache[block, slot] = torch.randn(num_kv_heads, head_dim, generator=gen)

    chunk_lens = [chunk for _, chunk in seqs]
    query_start_loc = torch.tensor([0] + chunk_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    query = torch.randn(sum(chunk_lens), num_heads, head_dim, generator=gen)
    seq_lens = torch.tensor([seq_len for seq_len, _ in seqs], dtype=torch.int32)
    tensors = dict(query=query.to(dtype), key_cache=key_cache.to(dtype), value_cache=value_cache.to(dtype),
                   block_tables=block_tables, seq_lens=seq_lens, query_start_loc=query_start_loc)
    return {name: t.to(device) for name, t in tensors.items()}


def check_against_reference(batch, scale=None, sliding_window=0, **kwargs):
    head_dim = batch["query"].shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    expected = paged_attention(**batch, scale=scale, sliding_window=sliding_window)
    actual = paged_attention_triton(**batch, scale=scale, sliding_window=sliding_window, **kwargs)
    assert actual.dtype == batch["query"].dtype and actual.shape == batch["query"].shape
    assert not actual.isnan().any(), "a NaN cache slot leaked into the output"
    atol, rtol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=rtol)
    return actual


@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_mixed_batch_gqa(head_dim, block_size):
    batch = make_batch(MIXED_BATCH, num_heads=8, num_kv_heads=2, head_dim=head_dim,
                       block_size=block_size, dtype=torch.float32, seed=block_size + head_dim)
    check_against_reference(batch)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 1), (32, 1), (12, 4)])
def test_head_layouts(num_heads, num_kv_heads):
    """MHA, MQA (one small group that is not a power of two, one wide), GQA of 3."""
    batch = make_batch(MIXED_BATCH, num_heads, num_kv_heads, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=num_heads * 10 + num_kv_heads)
    check_against_reference(batch)


@pytest.mark.parametrize("head_dim", [96, 112, 128, 256])
def test_other_head_sizes(head_dim):
    batch = make_batch([(29, 1), (40, 9)], num_heads=4, num_kv_heads=2, head_dim=head_dim,
                       block_size=16, dtype=torch.float32, seed=head_dim)
    check_against_reference(batch)


@pytest.mark.parametrize("sliding_window", [1, 8, 17])
def test_sliding_window(sliding_window):
    # The 20-token chunk spans several windows and (group of 8 -> 8 tokens
    # per tile) three query tiles, whose rows start their windows in
    # different blocks.
    seqs = [(45, 1), (60, 20), (12, 12), (5, 1)]
    batch = make_batch(seqs, num_heads=8, num_kv_heads=1, head_dim=64, block_size=8,
                       dtype=torch.float32, seed=sliding_window)
    check_against_reference(batch, sliding_window=sliding_window)


def test_decode_only():
    seqs = [(1, 1), (16, 1), (17, 1), (90, 1), (33, 1)]
    batch = make_batch(seqs, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=4)
    check_against_reference(batch)


def test_strided_query_and_out():
    """query as a view into a fused qkv buffer; out as a view into a wider one."""
    batch = make_batch(MIXED_BATCH, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=8)
    num_tokens = batch["query"].shape[0]
    qkv = torch.randn(num_tokens, 8, 64, device=DEVICE)
    qkv[:, :4] = batch["query"]
    out_buffer = torch.full((num_tokens, 6, 64), 5.0, device=DEVICE)
    result = check_against_reference({**batch, "query": qkv[:, :4]}, out=out_buffer[:, 1:5])
    assert result.data_ptr() == out_buffer[:, 1:5].data_ptr()
    assert (out_buffer[:, 0] == 5.0).all() and (out_buffer[:, 5] == 5.0).all()


def test_long_context():
    seqs = [(700, 1), (300, 40)]
    batch = make_batch(seqs, num_heads=4, num_kv_heads=1, head_dim=64, block_size=32,
                       dtype=torch.float32, seed=3)
    check_against_reference(batch)


def test_peaked_softmax():
    """A large scale makes each row's max move a lot between KV steps."""
    batch = make_batch(MIXED_BATCH, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=11)
    check_against_reference(batch, scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    # bf16 loads work under the interpreter (it stores them as uint16 and
    # converts on the fp32 cast); if a Triton release drops that, pass fp32
    # copies of the bf16 data here instead.
    batch = make_batch(MIXED_BATCH, num_heads=8, num_kv_heads=2, head_dim=80, block_size=16,
                       dtype=dtype, seed=5)
    check_against_reference(batch)


def test_explicit_max_query_len_and_out():
    batch = make_batch(MIXED_BATCH, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=9)
    out = torch.full_like(batch["query"], 7.0)
    max_query_len = max(chunk for _, chunk in MIXED_BATCH)
    result = check_against_reference(batch, max_query_len=max_query_len, out=out)
    assert result.data_ptr() == out.data_ptr()


def test_empty_batch():
    batch = make_batch([(10, 0)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32)
    assert paged_attention_triton(**batch, scale=0.125).shape == (0, 4, 64)


def test_rejects_bad_inputs():
    batch = make_batch([(20, 4)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32)
    bad_inputs = [
        ("query", batch["query"][0], "query must be"),
        ("query", batch["query"][..., :32], "cache head_dim"),
        ("query", batch["query"][:, :3], "multiple of num_kv_heads"),
        ("query", batch["query"].double(), "query dtype"),
        ("value_cache", batch["value_cache"][..., :32], "value_cache shape"),
        ("value_cache", batch["value_cache"].half(), "share a dtype"),
        ("block_tables", batch["block_tables"].long(), "block_tables must be int32"),
        ("seq_lens", batch["seq_lens"].repeat(2), "seq_lens must have shape"),
        ("query_start_loc", batch["query_start_loc"][:1], "query_start_loc must have shape"),
    ]
    for name, bad, message in bad_inputs:
        with pytest.raises(ValueError, match=message):
            paged_attention_triton(**{**batch, name: bad}, scale=0.125)
    with pytest.raises(ValueError, match="out shape"):
        paged_attention_triton(**batch, scale=0.125, out=batch["query"][:2])
    outside = batch["block_tables"].clone()
    outside[0, 1] = batch["key_cache"].shape[0]
    bad_contents = [
        ("block_tables", outside, "outside the pool"),
        ("seq_lens", batch["seq_lens"] - 17, "more query tokens than its seq_len"),
        ("seq_lens", batch["seq_lens"] + 1000, "more blocks than block_tables has columns"),
        ("query_start_loc", batch["query_start_loc"] + 1, "query_start_loc\\[0\\] must be 0"),
    ]
    for name, bad, message in bad_contents:
        with pytest.raises(ValueError, match=message):
            paged_attention_triton(**{**batch, name: bad}, scale=0.125)
    for partition_size in (0, 32, 100):
        with pytest.raises(ValueError, match="partition_size"):
            paged_attention_triton(**batch, scale=0.125, partition_size=partition_size)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pool_beyond_int32_offsets():
    """Blocks past element 2**31 of the pool must be addressed with int64 offsets."""
    block_size, num_kv_heads, head_dim = 16, 1, 128
    elements_per_block = block_size * num_kv_heads * head_dim
    num_blocks = 2**31 // elements_per_block + 64  # ~4.3 GB per fp16 cache
    small = make_batch([(100, 1), (60, 20)], 4, num_kv_heads, head_dim, block_size,
                       torch.float16, seed=1, spare_blocks=0)
    used = small["key_cache"].shape[0]
    key_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float16, device="cuda")
    value_cache = torch.empty_like(key_cache)
    key_cache[-used:] = small["key_cache"]  # the sequences live at the very end of the pool
    value_cache[-used:] = small["value_cache"]
    batch = {**small, "key_cache": key_cache, "value_cache": value_cache,
             "block_tables": small["block_tables"] + (num_blocks - used)}
    check_against_reference(batch)


def test_selectable_as_backend_and_agrees_with_the_native_kernel():
    from kevlarflow import ops

    batch = make_batch(MIXED_BATCH, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=11)
    args = [batch[k] for k in ("query", "key_cache", "value_cache", "block_tables", "seq_lens",
                               "query_start_loc")]
    native = ops.paged_attention(*[a.cpu() for a in args], 0.125, sliding_window=9)
    triton_out = ops.paged_attention(*args, 0.125, sliding_window=9, backend="triton")
    torch.testing.assert_close(triton_out.cpu(), native, atol=1e-4, rtol=1e-4)


# Split over the context: partitions of SMALL_PARTITION keys (the smallest
# allowed) so that short contexts, cheap under the interpreter, span several.
SMALL_PARTITION = 64


@pytest.fixture
def nan_workspace(monkeypatch):
    """The kernel's fp32 partials start as NaN instead of whatever memory held:
    a slot read that no program wrote (a partition past the causal end or
    before the window) then poisons the output."""
    allocate = triton_module._allocate_workspace

    def poisoned(*args, **kwargs):
        buffers = allocate(*args, **kwargs)
        for buffer in buffers:
            buffer.fill_(float("nan"))
        return buffers

    monkeypatch.setattr(triton_module, "_allocate_workspace", poisoned)


def chunk_rows(batch, seq):
    starts = batch["query_start_loc"].tolist()
    return slice(starts[seq], starts[seq + 1])


def select(batch, seqs):
    """The batch of sequences seqs (in that order) of batch, over the same cache."""
    rows = [chunk_rows(batch, i) for i in seqs]
    chunk_lens = [r.stop - r.start for r in rows]
    index = torch.tensor(seqs, dtype=torch.long, device=batch["seq_lens"].device)
    return {**batch,
            "query": torch.cat([batch["query"][r] for r in rows]),
            "block_tables": batch["block_tables"][index],
            "seq_lens": batch["seq_lens"][index],
            "query_start_loc": torch.tensor([0] + chunk_lens, dtype=torch.int32,
                                            device=batch["seq_lens"].device).cumsum(0, dtype=torch.int32)}


def as_decode_steps(batch, seq, tokens):
    """A decode batch: token j of sequence seq's chunk as a decode step at the
    same position, over the same cache (the block table row, seq_len cut
    right after the token)."""
    start = chunk_rows(batch, seq).start
    chunk_len = chunk_rows(batch, seq).stop - start
    seq_len = int(batch["seq_lens"][seq])
    device = batch["seq_lens"].device
    return {**batch,
            "query": batch["query"][[start + j for j in tokens]],
            "block_tables": batch["block_tables"][[seq] * len(tokens)],
            "seq_lens": torch.tensor([seq_len - chunk_len + j + 1 for j in tokens], dtype=torch.int32,
                                     device=device),
            "query_start_loc": torch.arange(len(tokens) + 1, dtype=torch.int32, device=device)}


# Contexts of up to five partitions; decode steps and prefill chunks of
# several lengths, two longer than a query tile (16 tokens at group 4), one
# a fresh prefill.
INVARIANCE_BATCH = [(300, 1), (45, 1), (200, 17), (130, 1), (24, 24), (260, 20), (64, 1), (7, 3)]
DTYPE_AND_WINDOW = [(dtype, window) for dtype in (torch.float32, torch.bfloat16) for window in (0, 100)]


@pytest.mark.parametrize("dtype,sliding_window", DTYPE_AND_WINDOW)
def test_output_bits_do_not_depend_on_the_batch(dtype, sliding_window, nan_workspace):
    """A token's output has the same bits alone as in any mixed batch."""
    batch = make_batch(INVARIANCE_BATCH, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=dtype, seed=21 + sliding_window)
    run = functools.partial(paged_attention_triton, scale=0.125, sliding_window=sliding_window,
                            partition_size=SMALL_PARTITION)
    full = run(**batch)
    assert not full.isnan().any()
    expected = paged_attention(**batch, scale=0.125, sliding_window=sliding_window)
    torch.testing.assert_close(full.float(), expected, atol=TOLERANCE[dtype][0], rtol=TOLERANCE[dtype][1])
    for seq in range(len(INVARIANCE_BATCH)):
        alone = run(**select(batch, [seq]))
        assert torch.equal(alone, full[chunk_rows(batch, seq)]), f"sequence {seq} alone differs"
    # Another mix, in another order: two chunks and two decodes.
    others = [5, 0, 2, 6]
    mixed = run(**select(batch, others))
    assert torch.equal(mixed, torch.cat([full[chunk_rows(batch, i)] for i in others]))


@pytest.mark.parametrize("dtype,sliding_window", DTYPE_AND_WINDOW)
def test_prefill_tokens_equal_decode_steps(dtype, sliding_window, nan_workspace):
    """Each token of a prefill chunk, the last one in particular, has the bits
    of a decode step at its position over the same cache."""
    seqs = [(45, 1), (280, 37), (12, 12)]
    batch = make_batch(seqs, num_heads=4, num_kv_heads=1, head_dim=64, block_size=16,
                       dtype=dtype, seed=5 + sliding_window)
    run = functools.partial(paged_attention_triton, scale=0.125, sliding_window=sliding_window,
                            partition_size=SMALL_PARTITION)
    prefill = run(**batch)
    # The chunk covers positions 243..279, across the partition boundary at
    # 256 (tokens 0..12 before it, 13..36 after), in query tiles of 16
    # tokens: the last token is row 4 of the third tile, a decode step row 0.
    # Every token, last first.
    tokens = list(range(36, -1, -1))
    decode = run(**as_decode_steps(batch, 1, tokens))
    start = chunk_rows(batch, 1).start
    for i, j in enumerate(tokens):
        assert torch.equal(decode[i], prefill[start + j]), f"token {j} differs as a decode step"
    # And the fresh prefill of sequence 2 (a single tile) likewise.
    decode = run(**as_decode_steps(batch, 2, [11, 4]))
    start = chunk_rows(batch, 2).start
    assert torch.equal(decode[0], prefill[start + 11]) and torch.equal(decode[1], prefill[start + 4])


def test_context_split_into_partitions(nan_workspace):
    """Contexts of many partitions agree with the reference, and the split
    is really made: another partition size rounds differently."""
    seqs = [(700, 1), (333, 1), (300, 40), (129, 1), (64, 64)]
    batch = make_batch(seqs, num_heads=4, num_kv_heads=1, head_dim=64, block_size=32,
                       dtype=torch.float32, seed=3)
    split = check_against_reference(batch, partition_size=SMALL_PARTITION)
    whole = check_against_reference(batch, partition_size=1024)
    # The 700-token decode spans 11 partitions of 64 but one of 1024.
    rows = chunk_rows(batch, 0)
    assert not torch.equal(split[rows], whole[rows])


@pytest.mark.parametrize("sliding_window", [100, 64, 1])
def test_sliding_window_across_partitions(sliding_window, nan_workspace):
    """Windows that start mid-partition (most tokens at 100 and 64 keys), on
    a partition boundary (position 255 at 64: 192..255) and at the token
    itself (1); partitions before the window are skipped, never read."""
    seqs = [(300, 1), (250, 20), (97, 1), (256, 1), (40, 40)]
    batch = make_batch(seqs, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=sliding_window)
    check_against_reference(batch, sliding_window=sliding_window, partition_size=SMALL_PARTITION)


def test_more_sequences_than_one_lookup_load(nan_workspace):
    """Over 128 sequences: finding a program's sequence takes two loads."""
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(130):
        seq_len = int(torch.randint(1, 40, (1,), generator=gen))
        seqs.append((seq_len, 1 if i % 3 else min(seq_len, 5)))
    seqs[129] = (90, 20)  # a late chunk of two tiles
    batch = make_batch(seqs, num_heads=4, num_kv_heads=1, head_dim=16, block_size=8,
                       dtype=torch.float32, seed=1)
    check_against_reference(batch, partition_size=SMALL_PARTITION)
