"""Continuous batching with chunked prefill under a token budget.

Every step, running sequences are served first: a decode token each, then
the next chunk of each unfinished prefill, in arrival order; then waiting
sequences are admitted first-come first-served while budget and blocks last.
When blocks run out, the most recently arrived running sequence is
preempted: its blocks are freed and it later recomputes its KV from scratch.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Container

from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    # (sequence, number of its tokens computed in this step), in batch order.
    items: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def samples(self) -> list[bool]:
        """Per item: its chunk reaches the end of its sequence, so this step
        yields the sequence's next token (partial prefill chunks do not)."""
        return [seq.num_computed_tokens + n == seq.num_tokens for seq, n in self.items]

    def chunks(self, table=lambda seq: seq.block_table) -> list[tuple[int, int, list[int]]]:
        """Per item: (tokens this step, position of the first, block table)."""
        return [(n, seq.num_computed_tokens, table(seq)) for seq, n in self.items]

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.blocks = blocks
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, busy: Container[Sequence] = (),
                 max_running: int | None = None, admit: bool = True) -> ScheduledBatch:
        """busy: running sequences of a batch still in flight (pipelines run
        several); they are neither scheduled nor preempted. max_running: the
        most running sequences this batch takes (a pipeline spreads them
        over its micro-batches); the rest wait for the next one. admit: False
        leaves the waiting sequences waiting (running ones only)."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # Running sequences: those that decode first, then those with a
        # prefill to go on with (or KV to recompute after a failure), oldest
        # first within each: a long prefill does not hold decodes back.
        queue = sorted((s for s in self.running if s not in busy),
                       key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, s.arrival_time))
        if max_running is not None:
            queue = queue[:max_running]
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                # The newest arrival goes first.
                victim = max(queue, key=lambda s: s.arrival_time) if queue else seq
                if victim is not seq:
                    queue.remove(victim)
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.items.append((seq, n))
                budget -= n
        still_running = [s for s in self.running if s.status == Status.RUNNING]
        # Waiting sequences, first come first served; a preempted one re-enters
        # at the front. Stop at the first that does not fit (no overtaking).
        while admit and self.waiting and budget > 0 and len(still_running) < self.max_num_seqs \
                and not batch.preempted:
            seq = self.waiting[0]
            seq.num_computed_tokens = self.blocks.reuse_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                self.blocks.free_sequence(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            still_running.append(seq)
            batch.items.append((seq, n))
            budget -= n
        self.running = still_running
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def preempt_all(self) -> None:
        """Preempt every running sequence; they go back to the front of the
        waiting queue, oldest first."""
        for seq in sorted(self.running, key=lambda s: s.arrival_time, reverse=True):
            self._preempt(seq)
        self.running = []

    def finish(self, seq: Sequence) -> None:
        """Release a sequence that finished (or was aborted)."""
        self.blocks.free_sequence(seq)
        self.drop(seq)

    def drop(self, seq: Sequence) -> None:
        """Take a finished sequence out of the queues; its blocks are the
        caller's to free."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
