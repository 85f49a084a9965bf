"""The native paged-attention op against the pure-torch fp32 reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kevlarflow import _C, ops, reference
from helpers.kv_batches import TOLERANCES, make_batch


def check_against_reference(batch, sliding_window=0):
    out = ops.paged_attention(*batch.args(), sliding_window=sliding_window)
    expected = reference.paged_attention(*batch.args(), sliding_window=sliding_window)
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    assert torch.isfinite(out).all(), "a NaN from an unused cache slot reached the output"
    atol, rtol = TOLERANCES[batch.query.dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    # The engine's path: the longest chunk from the caller, contents on trust.
    chunks = batch.query_start_loc[1:] - batch.query_start_loc[:-1]
    trusted = ops.paged_attention(*batch.args(), sliding_window=sliding_window,
                                  max_query_len=int(chunks.max()) if chunks.numel() else 0)
    assert torch.equal(trusted, out)


# A mixed batch: decodes, a chunk that starts the sequence, chunks with context,
# a sequence with no query this step, a context that is an exact block multiple.
MIXED_CONTEXTS = [1, 37, 64, 90, 16, 130]
MIXED_CHUNKS = [1, 37, 1, 13, 0, 64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_mixed_batch_all_shapes(dtype, head_dim, block_size):
    batch = make_batch(MIXED_CONTEXTS, MIXED_CHUNKS, num_heads=8, num_kv_heads=2,
                       head_dim=head_dim, block_size=block_size, dtype=dtype, seed=head_dim)
    check_against_reference(batch)


def test_the_best_variant_is_the_avx2_one_where_the_cpu_has_it(monkeypatch):
    """What isa="best" runs, against the CPU's own flags (Linux reports them
    in /proc/cpuinfo): the AVX2+FMA build wherever it can run."""
    monkeypatch.delenv("KEVLARFLOW_CPU_ISA", raising=False)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f
                          if line.startswith("flags")), set())
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    want = "avx2" if {"avx2", "fma"} <= flags else "generic"
    assert _C.cpu_attention_isa() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_portable_cpu_variant(monkeypatch, dtype, head_dim):
    # Machines without AVX2+FMA run the generic build of the kernel.
    monkeypatch.setenv("KEVLARFLOW_CPU_ISA", "generic")
    assert _C.cpu_attention_isa() == "generic"
    batch = make_batch(MIXED_CONTEXTS, MIXED_CHUNKS, 8, 2, head_dim, 16, dtype=dtype)
    check_against_reference(batch)
    check_against_reference(batch, sliding_window=9)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (12, 1), (32, 8), (64, 1)])
def test_head_groupings(num_heads, num_kv_heads):
    batch = make_batch([70, 5, 200], [1, 5, 40], num_heads, num_kv_heads, 64, 16)
    check_against_reference(batch)


@pytest.mark.parametrize("window", [1, 7, 16, 50, 1000])
@pytest.mark.parametrize("block_size", [8, 32])
def test_sliding_window(window, block_size):
    batch = make_batch([1, 33, 150, 300], [1, 20, 1, 70], 8, 2, 64, block_size, seed=window)
    check_against_reference(batch, sliding_window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_contexts(dtype):
    batch = make_batch([2048, 1999, 1500], [1, 300, 1], 8, 2, 128, 16, dtype=dtype)
    check_against_reference(batch)


def test_pool_larger_than_32_bit_offsets():
    # 140k blocks of 16 x 8 x 128 elements: block ids near the top of the pool
    # sit past 2^31 elements, so any 32-bit offset arithmetic reads elsewhere.
    num_blocks = 140_000
    assert num_blocks * 16 * 8 * 128 > 2**31
    batch = make_batch([100, 1, 40], [1, 1, 40], 32, 8, 128, 16, dtype=torch.bfloat16,
                       num_blocks=num_blocks, use_top_blocks=True)
    assert int(batch.block_tables.max()) * 16 * 8 * 128 > 2**31
    check_against_reference(batch)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_batches(data):
    num_kv_heads = data.draw(st.sampled_from([1, 2, 4]))
    group = data.draw(st.sampled_from([1, 2, 3, 8]))
    block_size = data.draw(st.sampled_from([8, 16, 32]))
    head_dim = data.draw(st.sampled_from([64, 80, 128]))
    num_seqs = data.draw(st.integers(1, 6))
    contexts = data.draw(st.lists(st.integers(1, 400), min_size=num_seqs, max_size=num_seqs))
    chunks = [data.draw(st.integers(0, c)) for c in contexts]
    window = data.draw(st.sampled_from([0, 0, 1, 5, 64]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    batch = make_batch(contexts, chunks, num_kv_heads * group, num_kv_heads, head_dim,
                       block_size, dtype=dtype, seed=data.draw(st.integers(0, 2**16)))
    check_against_reference(batch, sliding_window=window)


@pytest.mark.parametrize("isa", ["best", "generic"])
@pytest.mark.parametrize("dtype,group", [(torch.float32, 4), (torch.bfloat16, 4),
                                         (torch.float32, 3)])
def test_token_result_independent_of_batch_and_chunking(monkeypatch, isa, dtype, group):
    """A token's output has the same bits whether it is computed inside a
    prefill chunk, as a lone decode, or as a decode among other sequences:
    recomputing lost KV after a failure must not change what is generated."""
    if isa == "generic":
        monkeypatch.setenv("KEVLARFLOW_CPU_ISA", "generic")
    # group 3: a lone decode has 3 rows (one at a time), a chunk has multiples
    # of 3 (mostly in groups of four): both code paths must agree bit for bit.
    context, chunk = 77, 20
    batch = make_batch([context], [chunk], 2 * group, 2, 64, 16, dtype=dtype, seed=3)
    in_chunk = ops.paged_attention(*batch.args())
    others = make_batch([50, 120], [1, 30], 2 * group, 2, 64, 16, dtype=dtype, seed=4)
    for j in range(chunk):
        pos_len = context - chunk + j + 1
        # Alone, as a decode of the token at position pos_len - 1.
        alone = ops.paged_attention(batch.query[j:j + 1], batch.key_cache, batch.value_cache,
                                    batch.block_tables, torch.tensor([pos_len], dtype=torch.int32),
                                    torch.tensor([0, 1], dtype=torch.int32), batch.scale)
        assert torch.equal(alone[0], in_chunk[j])
        # Among other sequences: their blocks are appended to the same pool.
        n = batch.key_cache.shape[0]
        kc = torch.cat([batch.key_cache, others.key_cache])
        vc = torch.cat([batch.value_cache, others.value_cache])
        tables = torch.full((3, others.block_tables.shape[1] + batch.block_tables.shape[1]), 0,
                            dtype=torch.int32)
        tables[0, :batch.block_tables.shape[1]] = batch.block_tables[0]
        tables[1:, :others.block_tables.shape[1]] = others.block_tables + n
        query = torch.cat([others.query[:1], batch.query[j:j + 1], others.query[1:]])
        mixed = ops.paged_attention(
            query, kc, vc, tables[[1, 0, 2]].contiguous(),
            torch.tensor([50, pos_len, 120], dtype=torch.int32),
            torch.tensor([0, 1, 2, 32], dtype=torch.int32), batch.scale)
        assert torch.equal(mixed[1], in_chunk[j])


def test_a_caller_s_max_query_len_is_held_to_the_batch():
    batch = make_batch([5, 40], [1, 17], 4, 2, 64, 8)
    with pytest.raises(RuntimeError, match=r"max_query_len \(19\) exceeds the number of query "
                                           r"tokens \(18\)"):
        ops.paged_attention(*batch.args(), max_query_len=19)


def test_opcheck():
    batch = make_batch([5, 40], [1, 17], 4, 2, 64, 8)
    for b in (batch, make_batch([5, 40], [1, 17], 4, 2, 64, 8, dtype=torch.bfloat16)):
        torch.library.opcheck(torch.ops.kevlarflow.paged_attention.default,
                              b.args() + (0,))
        torch.library.opcheck(torch.ops.kevlarflow.paged_attention.default,
                              b.args() + (4,))
        torch.library.opcheck(torch.ops.kevlarflow.paged_attention.default,
                              b.args() + (0, 17))


def test_under_torch_compile():
    batch = make_batch([30, 9], [1, 9], 4, 2, 64, 16)

    @torch.compile(fullgraph=True, backend="inductor", dynamic=False)
    def attend(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc):
        out = torch.ops.kevlarflow.paged_attention(
            query * 2.0, key_cache, value_cache, block_tables, seq_lens, query_start_loc, 0.5, 0)
        return out + 1.0

    expected = ops.paged_attention(batch.query * 2.0, *batch.args()[1:6], 0.5) + 1.0
    assert torch.equal(attend(*batch.args()[:6]), expected)
