"""Every bad call of a native op is a Python exception naming the problem:
never a crash, a hang, or silently wrong numbers."""
import pytest
import torch

from kevlarflow import ops
from helpers.kv_batches import make_batch


@pytest.fixture
def batch():
    return make_batch([20, 9], [1, 9], 4, 2, 64, 8)


def attend(b, **changes):
    args = dict(query=b.query, key_cache=b.key_cache, value_cache=b.value_cache,
                block_tables=b.block_tables, seq_lens=b.seq_lens,
                query_start_loc=b.query_start_loc, scale=b.scale)
    args.update(changes)
    return ops.paged_attention(**args)


@pytest.mark.parametrize("change,message", [
    (lambda b: {"query": b.query[0]}, "query must be 3-D"),
    (lambda b: {"query": b.query.double()}, "must be float32, bfloat16 or float16"),
    (lambda b: {"key_cache": b.key_cache.half()}, "must have query's dtype"),
    (lambda b: {"value_cache": b.value_cache[:, :4].contiguous()}, "value_cache shape"),
    (lambda b: {"query": b.query[:, :3].contiguous()}, "multiple of num_kv_heads"),
    (lambda b: {"query": b.query[..., :60].contiguous()}, "head_dim"),
    (lambda b: {"query": b.query.transpose(0, 1).contiguous().transpose(0, 1)},
     "query must be contiguous"),
    (lambda b: {"key_cache": b.key_cache.transpose(1, 2).contiguous().transpose(1, 2)},
     "key_cache must be contiguous"),
    (lambda b: {"block_tables": b.block_tables.long()}, "block_tables must be Int"),
    (lambda b: {"block_tables": b.block_tables[:, ::2]}, "block_tables must be contiguous"),
    (lambda b: {"block_tables": b.block_tables[:1]}, "block_tables has 1 rows"),
    (lambda b: {"seq_lens": torch.tensor([-1, 9], dtype=torch.int32)}, "negative"),
    (lambda b: {"seq_lens": torch.tensor([20, 5], dtype=torch.int32)}, "query tokens but seq_len"),
    (lambda b: {"seq_lens": torch.tensor([20, 900], dtype=torch.int32)}, "columns"),
    (lambda b: {"query_start_loc": torch.tensor([0, 1, 9], dtype=torch.int32)},
     "must equal the number of query tokens"),
    (lambda b: {"query_start_loc": torch.tensor([0, 5, 1, 10], dtype=torch.int32)},
     r"num_seqs \+ 1"),
    (lambda b: {"query_start_loc": torch.tensor([1, 2, 10], dtype=torch.int32)},
     "query_start_loc\\[0\\] must be 0"),
    (lambda b: {"scale": float("nan")}, "scale must be finite"),
    (lambda b: {"query": b.query.to("meta")}, "tensors on one device"),
])
def test_paged_attention_rejects(batch, change, message):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        attend(batch, **change(batch))


@pytest.mark.parametrize("bad_id", [-1, 10_000])
def test_paged_attention_rejects_block_ids_outside_the_pool(batch, bad_id):
    tables = batch.block_tables.clone()
    tables[1, 1] = bad_id
    with pytest.raises(RuntimeError, match=r"block_tables\[1\]\[1\] = .* outside the pool"):
        attend(batch, block_tables=tables)


def test_paged_attention_ignores_padding_past_a_sequence(batch):
    # Entries beyond the blocks a sequence needs are padding, not errors.
    tables = batch.block_tables.clone()
    tables[0, -1] = -7
    torch.testing.assert_close(attend(batch, block_tables=tables), attend(batch))


def test_unknown_attention_backend(batch):
    with pytest.raises(ValueError, match="unknown attention backend"):
        ops.paged_attention(*batch.args(), backend="magic")


def caches(n=2, blocks=10):
    return [torch.zeros(blocks, 8, 2, 16) for _ in range(n)]


def test_reshape_and_cache_rejects():
    kc, vc = caches()
    key = torch.randn(3, 2, 16)
    with pytest.raises(RuntimeError, match="slot_mapping holds slot 80"):
        ops.reshape_and_cache(key, key, kc, vc, torch.tensor([0, 80, -1]))
    with pytest.raises(RuntimeError, match="writes one slot twice"):
        ops.reshape_and_cache(key, key, kc, vc, torch.tensor([4, 4, -1]))
    with pytest.raises(TypeError, match="slot_mapping must be Long"):
        ops.reshape_and_cache(key, key, kc, vc, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="3 tokens"):
        ops.reshape_and_cache(key, key, kc, vc, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="do not match the cache"):
        ops.reshape_and_cache(torch.randn(3, 1, 16), torch.randn(3, 1, 16), kc, vc,
                              torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="dense within a token"):
        wide = torch.randn(3, 2, 32)[..., ::2]
        ops.reshape_and_cache(wide, wide, kc, vc, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="share one dtype"):
        ops.reshape_and_cache(key.half(), key.half(), kc, vc, torch.tensor([0, 1, 2]))
    assert not kc.any() and not vc.any(), "a rejected call wrote into the cache"


def test_block_ops_reject():
    cs = caches()
    with pytest.raises(RuntimeError, match="block_ids must lie in"):
        ops.pack_blocks(cs, torch.tensor([0, 10]))
    with pytest.raises(RuntimeError, match="block_ids must lie in"):
        ops.pack_blocks(cs, torch.tensor([-1]))
    with pytest.raises(TypeError, match="block_ids must be Long"):
        ops.pack_blocks(cs, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="staging holds"):
        ops.pack_blocks(cs, torch.tensor([1, 2]), torch.empty(3))
    with pytest.raises(TypeError, match="staging must have the caches' dtype"):
        ops.pack_blocks(cs, torch.tensor([1]), torch.empty(1, 2, 8, 2, 16, dtype=torch.half))
    with pytest.raises(RuntimeError, match="tensors on one device"):
        ops.pack_blocks(cs, torch.tensor([1]), torch.empty(1, 2, 8, 2, 16, device="meta"))
    with pytest.raises(RuntimeError, match="list of caches is empty"):
        ops.copy_blocks([], torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="cache 1 is"):
        ops.copy_blocks([cs[0], torch.zeros(10, 8, 2, 8)], torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="are the same tensor"):
        ops.copy_blocks([cs[0], cs[0]], torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="destination block twice"):
        ops.copy_blocks(cs, torch.tensor([[0, 1], [2, 1]]))
    with pytest.raises(RuntimeError, match="both as a source and a destination"):
        ops.copy_blocks(cs, torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(RuntimeError, match=r"\[num_pairs, 2\]"):
        ops.copy_blocks(cs, torch.tensor([[0, 1, 2]]))
    staging = ops.pack_blocks(cs, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="destination block twice"):
        ops.unpack_blocks(staging, torch.tensor([3, 3]), cs)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.unpack_blocks(staging, torch.tensor([3, 4]),
                          [c.transpose(1, 2) for c in cs])
    assert all(not c.any() for c in cs), "a rejected call wrote into a cache"
