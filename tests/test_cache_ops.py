"""reshape_and_cache, copy_blocks and pack/unpack against the torch reference;
moving KV must be bit-exact, so these compare bits, not values."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kevlarflow import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_bits(shape, dtype, seed=0):
    """Arbitrary bit patterns, NaNs and infinities included: a copy that goes
    through float arithmetic or conversion would change some of them."""
    gen = torch.Generator().manual_seed(seed)
    int_type = {4: torch.int32, 2: torch.int16}[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(int_type)
    raw = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64)
    return raw.to(int_type).view(dtype)


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("trusted", [False, True])  # True: the engine's path, slots unread
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_writes_slots_and_skips_negative(dtype, trusted):
    shape = (20, 8, 2, 64)
    key_cache, value_cache = random_bits(shape, dtype, 1), random_bits(shape, dtype, 2)
    key, value = random_bits((13, 2, 64), dtype, 3), random_bits((13, 2, 64), dtype, 4)
    slots = torch.randperm(20 * 8)[:13]
    slots[[2, 7]] = -1
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reference.reshape_and_cache(key, value, expected_k, expected_v, slots)
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots, trusted=trusted)
    assert same_bits(key_cache, expected_k) and same_bits(value_cache, expected_v)


def test_reshape_and_cache_takes_rows_of_a_wider_projection():
    qkv = torch.randn(9, 3, 4, 32)  # [tokens, q/k/v, heads, head_dim]
    key, value = qkv[:, 1], qkv[:, 2]
    assert not key.is_contiguous()
    key_cache, value_cache = torch.zeros(4, 4, 4, 32), torch.zeros(4, 4, 4, 32)
    slots = torch.arange(9) + 3
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache.view(16, 4, 32)[3:12], key)
    assert torch.equal(value_cache.view(16, 4, 32)[3:12], value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks(dtype):
    caches = [random_bits((30, 16, 2, 64), dtype, seed) for seed in range(4)]
    expected = [c.clone() for c in caches]
    mapping = torch.tensor([[3, 10], [3, 11], [29, 0], [7, 8]])
    reference.copy_blocks(expected, mapping)
    ops.copy_blocks(caches, mapping)
    assert all(same_bits(c, e) for c, e in zip(caches, expected))


@settings(max_examples=30, deadline=None)
@given(num_caches=st.integers(1, 6), block_size=st.sampled_from([8, 16, 32]),
       dtype=st.sampled_from(DTYPES), data=st.data())
def test_pack_unpack_round_trip_is_bit_exact(num_caches, block_size, dtype, data):
    num_blocks = 64
    caches = [random_bits((num_blocks, block_size, 2, 32), dtype, s) for s in range(num_caches)]
    ids = torch.tensor(data.draw(st.lists(st.integers(0, num_blocks - 1), max_size=20,
                                          unique=True)), dtype=torch.int64)
    staging = ops.pack_blocks(caches, ids)
    assert same_bits(staging, reference.pack_blocks(caches, ids))
    # Scatter into other blocks of a second pool, then gather back.
    targets = torch.randperm(num_blocks)[: ids.numel()]
    other = [torch.zeros_like(c) for c in caches]
    ops.unpack_blocks(staging, targets, other)
    expected = [torch.zeros_like(c) for c in caches]
    reference.unpack_blocks(staging, targets, expected)
    assert all(same_bits(o, e) for o, e in zip(other, expected))
    assert same_bits(ops.pack_blocks(other, targets), staging)


def test_pack_into_a_given_buffer_and_large_pool():
    # 70k blocks and ids near the top: byte offsets above 2^31.
    caches = [torch.empty(70_000, 16, 8, 128, dtype=torch.bfloat16) for _ in range(2)]
    ids = torch.tensor([69_999, 40_000, 65_536])
    for c in caches:
        c[ids] = random_bits((3, 16, 8, 128), torch.bfloat16)
    staging = torch.empty(ops.staging_shape(caches, 3), dtype=torch.bfloat16)
    assert ops.pack_blocks(caches, ids, staging) is staging
    assert same_bits(staging, reference.pack_blocks(caches, ids))


def test_opcheck_cache_ops():
    caches = [torch.randn(12, 8, 2, 16) for _ in range(2)]
    key, value = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    op = torch.ops.kevlarflow
    torch.library.opcheck(op.reshape_and_cache.default,
                          (key, value, caches[0], caches[1], torch.tensor([0, -1, 9, 30, 95])))
    torch.library.opcheck(op.copy_blocks.default, (caches, torch.tensor([[0, 5], [1, 6]])))
    ids = torch.tensor([3, 0, 11])
    staging = torch.empty(3, 2, 8, 2, 16)
    torch.library.opcheck(op.pack_blocks.default, (caches, ids, staging))
    torch.library.opcheck(op.unpack_blocks.default, (staging, ids, caches))


def test_cache_ops_under_torch_compile():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def write_then_pack(key, value, key_cache, value_cache, slots, ids):
        torch.ops.kevlarflow.reshape_and_cache(key * 2, value, key_cache, value_cache, slots)
        staging = torch.empty(ids.numel(), 2, *key_cache.shape[1:])
        torch.ops.kevlarflow.pack_blocks([key_cache, value_cache], ids, staging)
        return staging

    key, value = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    kc, vc = torch.zeros(6, 4, 2, 16), torch.zeros(6, 4, 2, 16)
    staging = write_then_pack(key, value, kc, vc, torch.tensor([0, 1, 2, 5]), torch.tensor([0, 1]))
    assert torch.equal(kc.view(24, 2, 16)[[0, 1, 2, 5]], key * 2)
    assert torch.equal(staging[0, 0], kc[0]) and torch.equal(staging[1, 1], vc[1])
