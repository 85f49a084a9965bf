"""One pipeline instance as the controller sees it: its stage workers, one KV
pool per worker (each with its own block ids), a scheduler, and the
micro-batches in flight.

Several micro-batches are in flight at once so that stages overlap: while
stage 1 runs batch A, stage 0 runs batch B. A sequence belongs to at most one
batch in flight; it is scheduled again once that batch's tokens are back."""
from __future__ import annotations

from dataclasses import dataclass

from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.scheduler import ScheduledBatch, Scheduler
from kevlarflow.engine.sequence import Sequence


class PipelineBlocks:
    """The scheduler's view of the pools of all stages: a sequence gets blocks
    in every stage's pool or in none."""

    def __init__(self, pools: list[BlockManager], on_free=None):
        self.pools = pools
        self.block_size = pools[0].block_size
        self.on_free = on_free  # told of every sequence whose KV is dropped

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        if any(p.blocks_needed(seq, num_tokens) > p.num_free_blocks for p in self.pools):
            return False
        for p in self.pools:
            p.allocate(seq, num_tokens)
        return True

    def free_sequence(self, seq: Sequence) -> None:
        for p in self.pools:
            p.free_sequence(seq)
        if self.on_free is not None:
            self.on_free(seq)

    def reuse_cached_prefix(self, seq: Sequence) -> int:
        # Only the prefix cached at every stage is reusable.
        reused = min(p.reuse_cached_prefix(seq) for p in self.pools)
        for p in self.pools:
            p.truncate(seq, reused // self.block_size)
        return reused

    def register_full_blocks(self, seq: Sequence) -> None:
        for p in self.pools:
            p.register_full_blocks(seq)


@dataclass
class MicroBatch:
    step: int
    batch: ScheduledBatch
    sampled: list[Sequence]  # sequences whose next token this batch produces


class PipelineInstance:
    def __init__(self, index: int, workers: list[str], pools: list[BlockManager],
                 max_num_batched_tokens: int, max_num_seqs: int, max_in_flight: int,
                 on_free=None):
        self.index = index
        self.home = list(workers)           # its own workers, stage order
        self.workers = workers              # the workers it runs on now (some borrowed)
        self.group = f"pipe{index}"         # the communicator of this pipeline
        self.generation = -1                # of that communicator; -1: none
        self.blocks = PipelineBlocks(pools, on_free)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens, max_num_seqs)
        self.max_in_flight = max_in_flight
        self.in_flight: dict[int, MicroBatch] = {}
        self.busy: set[Sequence] = set()
        # Set by recovery from the instance's phase: it takes steps; it takes
        # new requests (it serves, or will without a new worker).
        self.serving = False
        self.accepting = False
        self.sequences: set[Sequence] = set()
        self.steps_dispatched = 0
        self.peak_in_flight = 0  # most micro-batches ever in flight at once

    def outstanding_tokens(self) -> int:
        return sum(max(0, len(s.prompt_token_ids) - s.num_computed_tokens)
                   + s.params.max_tokens - len(s.output_token_ids) for s in self.sequences)

    def add(self, seq: Sequence) -> None:
        self.sequences.add(seq)
        self.scheduler.add(seq)

    def preempt_all(self) -> None:
        """Drop the KV of every sequence (it is recomputed, prompt plus the
        tokens generated so far, when scheduled again); nothing is in flight."""
        self.abandon_in_flight()
        self.scheduler.preempt_all()

    def abandon_in_flight(self) -> None:
        """Its micro-batches in flight will never come back: their sequences
        are scheduled again (from their computed tokens, which they did not
        advance), and those that ended meanwhile give their blocks back."""
        for mb in self.in_flight.values():
            for seq, _ in mb.batch.items:
                if seq.is_finished:
                    self.blocks.free_sequence(seq)
        self.in_flight.clear()
        self.busy.clear()

    def running(self) -> list[Sequence]:
        """Sequences that hold KV."""
        return [seq for seq in self.scheduler.running if seq.num_computed_tokens]

    def use_workers(self, workers: list[str], pools: list[BlockManager]) -> None:
        self.workers = list(workers)
        self.blocks.pools = pools

    def can_dispatch(self) -> bool:
        return self.serving and len(self.in_flight) < self.max_in_flight \
            and self.scheduler.has_work()

    def schedule(self, admit: bool = True) -> ScheduledBatch:
        """The next micro-batch; admit=False: of running requests only."""
        # Each micro-batch in flight takes its share of the running
        # sequences: else, when all are free at once (as after a failure),
        # one micro-batch takes them all, the next finds none, and the stages
        # take turns instead of overlapping.
        share = -(-len(self.scheduler.running) // self.max_in_flight)
        batch = self.scheduler.schedule(self.busy, max(1, share),
                                        admit=admit or not self.scheduler.running)
        if not batch and not self.in_flight and self.scheduler.waiting \
                and not self.scheduler.running:
            # Idle, yet the next request does not fit: an error if it never
            # can; else a borrowed worker's pool is full of the other
            # pipeline's requests, which free it as they finish.
            seq = self.scheduler.waiting[0]
            if any(p.blocks_needed(seq, seq.num_tokens) > p.capacity for p in self.blocks.pools):
                raise RuntimeError(f"instance {self.index}: the KV pools cannot hold the next "
                                   "waiting request")
        return batch

    def stage_messages(self, step: int, batch: ScheduledBatch) -> tuple[list[dict], list[Sequence]]:
        """The step message of each stage (fields of protocol's "step"), and
        the sequences whose next token this batch samples."""
        samples = batch.samples()
        sampled = [seq for (seq, _), s in zip(batch.items, samples) if s]
        messages = []
        last = len(self.workers) - 1
        for stage, pool in enumerate(self.blocks.pools):
            token_ids = None
            if stage == 0:
                token_ids = [t for seq, n in batch.items
                             for t in seq.token_ids(seq.num_computed_tokens, seq.num_computed_tokens + n)]
            sample = None
            if stage == last:
                sample = [_sampling_row(seq) if s else None
                          for (seq, _), s in zip(batch.items, samples)]
            messages.append(dict(step=step, group=self.group, token_ids=token_ids, sample=sample,
                                 seqs=[list(chunk) for chunk in batch.chunks(pool.table)]))
        return messages, sampled


def _sampling_row(seq: Sequence) -> dict:
    p = seq.params
    return dict(temperature=float(p.temperature), top_k=p.top_k, top_p=float(p.top_p),
                min_p=float(p.min_p), seed=p.seed, index=len(seq.output_token_ids),
                logprobs=p.logprobs)
