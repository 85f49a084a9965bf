"""Blocks of one KV pool: a free list, reference counts, and an optional
prefix cache that lets requests with a common prompt prefix share blocks."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from kevlarflow.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 pool: str | None = None):
        """pool: the name under which sequences keep their table of this pool
        (Sequence.pool_tables); None for the engine's only pool (block_table)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got "
                             f"{num_blocks} blocks of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.pool = pool
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks, least recently freed first: a freed block keeps its cached
        # contents until it is handed out again, so reuse favours old blocks.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[bytes, int] = {}      # block hash -> block id
        self.block_hash: dict[int, bytes] = {}  # block id -> its hash while cached
        self.lent = 0  # blocks taken out of use by lend()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        """Blocks this pool can hand out at most (those not lent)."""
        return self.num_blocks - self.lent

    def table(self, seq: Sequence) -> list[int]:
        return seq.block_table if self.pool is None else seq.pool_tables.setdefault(self.pool, [])

    def hashes(self, seq: Sequence) -> list[bytes]:
        return seq.block_hashes if self.pool is None else seq.pool_hashes.setdefault(self.pool, [])

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(self.table(seq)))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; False if the pool
        is short (then nothing changes)."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free):
            return False
        table = self.table(seq)
        for _ in range(needed):
            block, _ = self.free.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            table.append(block)
        return True

    def free_sequence(self, seq: Sequence) -> None:
        self.truncate(seq, 0)

    def truncate(self, seq: Sequence, num_blocks: int) -> None:
        """Give back every block of seq's table past the first num_blocks."""
        table, hashes = self.table(seq), self.hashes(seq)
        while len(table) > num_blocks:  # tail blocks are the least shareable
            block = table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        del hashes[num_blocks:]

    # Blocks lent out (replica blocks) ----------------------------------------

    def lend(self, n: int) -> list[int]:
        """Take up to n free blocks out of this pool's use (they then hold
        replicas for another worker) and return their ids."""
        lent = []
        while len(lent) < n and self.free:
            block, _ = self.free.popitem(last=False)
            self._forget(block)
            lent.append(block)
        self.lent += len(lent)
        return lent

    def adopt(self, seq: Sequence, blocks: list[int]) -> None:
        """Lent blocks come back as seq's first blocks (they hold its KV)."""
        table = self.table(seq)
        if table:
            raise ValueError("adopt: the sequence already has blocks in this pool")
        for block in blocks:
            self.ref_counts[block] = 1
            table.append(block)
        self.lent -= len(blocks)

    # Prefix caching ---------------------------------------------------------

    def _forget(self, block: int) -> None:
        h = self.block_hash.pop(block, None)
        if h is not None and self.cached.get(h) == block:
            del self.cached[h]

    @staticmethod
    def _hash(previous: bytes | None, tokens: list[int]) -> bytes:
        # A cryptographic digest of the whole prefix: a collision would
        # silently hand one request another's KV.
        return hashlib.sha256((previous or b"") + array("q", tokens).tobytes()).digest()

    def reuse_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence with nothing computed: take over the cached blocks
        of its longest cached prefix and return how many tokens they cover.
        The last token is always left to compute: its logits are needed."""
        table, hashes = self.table(seq), self.hashes(seq)
        if not self.enable_prefix_caching or seq.num_computed_tokens or table:
            return 0
        previous = None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.token_ids(i * self.block_size, (i + 1) * self.block_size)
            h = self._hash(previous, tokens)
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            table.append(block)
            hashes.append(h)
            previous = h
        return len(table) * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the blocks of seq that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        table, hashes = self.table(seq), self.hashes(seq)
        full = seq.num_computed_tokens // self.block_size
        while len(hashes) < full:
            i = len(hashes)
            previous = hashes[-1] if hashes else None
            h = self._hash(previous, seq.token_ids(i * self.block_size, (i + 1) * self.block_size))
            hashes.append(h)
            block = table[i]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h
