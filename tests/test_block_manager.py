"""Block accounting: allocation, freeing, reference counts, prefix sharing."""
from hypothesis import given, settings
from hypothesis import strategies as st

from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.params import SamplingParams
from kevlarflow.engine.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, None, list(tokens), SamplingParams())


def test_allocate_grows_and_refuses_without_side_effects():
    blocks = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(10))
    assert blocks.allocate(s, 10) and len(s.block_table) == 3
    assert blocks.allocate(s, 12) and len(s.block_table) == 3  # still fits
    other = seq(range(9), "o")
    assert not blocks.allocate(other, 9)  # needs 3, 1 is free
    assert other.block_table == [] and blocks.num_free_blocks == 1
    blocks.free_sequence(s)
    assert blocks.num_free_blocks == 4 and s.block_table == []


def test_prefix_blocks_are_shared_and_freed_by_reference_count():
    blocks = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = seq(range(10))
    blocks.allocate(first, 10)
    first.num_computed_tokens = 10
    blocks.register_full_blocks(first)  # blocks 0 and 1 of first are full
    second = seq(list(range(8)) + [99, 98], "b")
    assert blocks.reuse_cached_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    assert [blocks.ref_counts[b] for b in second.block_table] == [2, 2]
    blocks.free_sequence(first)
    assert [blocks.ref_counts[b] for b in second.block_table] == [1, 1]
    # A different prefix shares nothing.
    third = seq([5] + list(range(1, 10)), "c")
    assert blocks.reuse_cached_prefix(third) == 0


def test_whole_cached_prompt_still_leaves_its_last_token_to_compute():
    blocks = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = seq(range(8))
    blocks.allocate(first, 8)
    first.num_computed_tokens = 8
    blocks.register_full_blocks(first)
    again = seq(range(8), "again")
    assert blocks.reuse_cached_prefix(again) == 4  # not 8: logits of token 7 are needed


def test_freed_cached_block_is_reused_then_evicted():
    blocks = BlockManager(num_blocks=2, block_size=4, enable_prefix_caching=True)
    a = seq(range(5))
    blocks.allocate(a, 5)
    a.num_computed_tokens = 5
    blocks.register_full_blocks(a)
    cached_block = a.block_table[0]
    blocks.free_sequence(a)
    b = seq(range(6), "b")
    assert blocks.reuse_cached_prefix(b) == 4 and b.block_table == [cached_block]
    blocks.free_sequence(b)
    # Fresh allocations take every block: the cached one is evicted, not shared.
    c = seq([7] * 8, "c")
    assert blocks.allocate(c, 8)
    assert not blocks.cached


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40)), max_size=40))
def test_counts_stay_consistent(ops):
    """Whatever the sequence of grows and frees, every block is either free
    or referenced, never both, and references match the block tables."""
    blocks = BlockManager(num_blocks=16, block_size=4)
    seqs = [seq(range(3), str(i)) for i in range(6)]
    for index, size in ops:
        s = seqs[index]
        if size > 35:
            blocks.free_sequence(s)
        else:
            blocks.allocate(s, size)
        refs = [0] * 16
        for t in seqs:
            for b in t.block_table:
                refs[b] += 1
        assert refs == blocks.ref_counts
        assert all((refs[b] == 0) == (b in blocks.free) for b in range(16))
