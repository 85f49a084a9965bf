"""One replication link as the controller sees it: the backup's blocks it
lends, which of them hold which sequence's KV, and how much of each
sequence is durable there (its watermark)."""
from __future__ import annotations

from dataclasses import dataclass, field

from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.sequence import Sequence
from kevlarflow.replication import link_group


@dataclass(eq=False)
class Record:
    """One sequence on one link."""
    durable: int = 0      # tokens whose KV is at the backup (acknowledged)
    sent: int = 0         # tokens whose blocks were handed to the source to copy
    dropped: bool = False  # the replica pool was full: no replicas until it ends


@dataclass
class ReplicaLink:
    source: str
    backup: str
    generation: int
    ids: list[int]                 # the backup's blocks lent to this link
    block_size: int
    acks: set[str] = field(default_factory=set)
    records: dict[Sequence, Record] = field(default_factory=dict)
    by_step: dict[int, list[tuple[Record, int]]] = field(default_factory=dict)
    step_rows: dict[int, int] = field(default_factory=dict)  # token rows each step copies
    rows_sent: int = 0             # handed to the source
    rows_acked: int = 0
    dropped: int = 0               # sequences that lost their replicas to a full pool

    def __post_init__(self):
        self.group = link_group(self.source)
        self.alloc = BlockManager(max(1, len(self.ids)), self.block_size,
                                  pool=f"replica {self.source}")

    @property
    def ready(self) -> bool:
        return self.acks >= {self.source, self.backup}

    def plan(self, seq: Sequence, n: int, table: list[int], step: int) -> list[list[int]]:
        """(source block, backup block, first row, end row) of each block
        that seq's chunk of n tokens in this step writes: the rows to copy.
        Rows written before seq had replicas here (before the link existed,
        or while it had none) go along the first time."""
        start = seq.num_computed_tokens
        end = start + n
        record = self.records.get(seq)
        if record is None or record.dropped:
            # A newcomer may take blocks from later requests; one that lost
            # its replicas takes free blocks only (taking them from others
            # in turn would have the pool copy the same requests over and
            # over, and keep none of them durable).
            room = self._make_room(seq, end) if record is None else \
                bool(self.ids) and self.alloc.allocate(seq, end)
            if not room:
                if record is None:
                    self.records[seq] = Record(dropped=True)
                    self.dropped += 1
                return []
            # (Again) with replicas: a new record, so that acknowledgements of
            # copies made before it lost them count for nothing.
            record = self.records[seq] = Record()
        elif not self._make_room(seq, end):
            self._drop(seq)
            return []
        replicas = self.alloc.table(seq)
        bs = self.block_size
        first = min(start, record.sent)
        pairs = [[table[k], self.ids[replicas[k]], max(first - k * bs, 0), min(end - k * bs, bs)]
                 for k in range(first // bs, -(-end // bs))]
        record.sent = max(record.sent, end)
        self.by_step.setdefault(step, []).append((record, end))
        rows = sum(p[3] - p[2] for p in pairs)
        self.step_rows[step] = self.step_rows.get(step, 0) + rows
        self.rows_sent += rows
        return pairs

    def _make_room(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for seq's first `tokens` tokens, taken from later requests
        if need be; False (nothing taken) if they cannot be had."""
        if not self.ids:  # a pool of nothing (its allocator has one block)
            return False
        while not self.alloc.allocate(seq, tokens):
            if not self._evict_newer_than(seq, tokens):
                return False
        return True

    def _evict_newer_than(self, seq: Sequence, tokens: int) -> bool:
        """The pool is full: the newest request that arrived after seq gives
        its replicas up, so that the earliest requests keep theirs (as a
        scheduler preempts the newest). False if there is none, or if even
        all of theirs would not make room for seq's `tokens`."""
        newer = [s for s, r in self.records.items()
                 if not r.dropped and s.arrival_time > seq.arrival_time]
        reclaimable = self.alloc.num_free_blocks + sum(len(self.alloc.table(s)) for s in newer)
        if not newer or self.alloc.blocks_needed(seq, tokens) > reclaimable:
            return False
        self._drop(max(newer, key=lambda s: s.arrival_time))
        return True

    def _drop(self, seq: Sequence) -> None:
        """No replicas of seq on this link until it ends (a copy of its
        still under way lands in blocks someone else may own by then: its
        acknowledgement no longer counts)."""
        self.alloc.free_sequence(seq)
        record = self.records[seq]
        record.dropped, record.durable = True, 0
        self.dropped += 1

    def acknowledged(self, steps: list[int]) -> None:
        for step in steps:
            self.rows_acked += self.step_rows.pop(step, 0)
            for record, end in self.by_step.pop(step, []):
                if not record.dropped:
                    record.durable = max(record.durable, end)

    def watermark(self, seq: Sequence) -> int:
        record = self.records.get(seq)
        return 0 if record is None or record.dropped else record.durable

    def forget(self, seq: Sequence) -> None:
        if self.records.pop(seq, None) is not None:
            self.alloc.free_sequence(seq)

    def take(self, seq: Sequence, tokens: int) -> list[int]:
        """The backup's blocks that hold seq's first `tokens` tokens; they
        leave the link (they become live blocks of the backup)."""
        keep = -(-tokens // self.block_size)
        taken = [self.ids[r] for r in self.alloc.table(seq)[:keep]]
        self.forget(seq)
        return taken
