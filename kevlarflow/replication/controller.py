"""The controller's side of KV replication: the backup ring, the replica
blocks each backup lends to its link, and the watermarks.

Each live home worker of stage s replicates to the next live home worker of
stage s in a ring: the worker that the router borrows when the source fails.
The ring is in instance order at first. A replacement joins it right after
the worker its instance borrows, so that the borrowed worker's replicas of
the instance's requests are on the replacement when the instance moves back
(with three or more instances, the borrowed worker's next in instance order
is another worker); the ring keeps that order afterwards. It is re-formed
after every change of membership.

Every worker's pool lends a fixed number of its blocks (the replica pool) to
the link it receives on; the controller allocates them per sequence, block
for block, like live blocks. A step message tells the source which of its
blocks to copy to which of the backup's, and the backup acknowledges steps
once their KV has arrived: the watermark of a sequence on a link is the
number of its tokens whose KV is then durable at the backup.

Policy when the replica pool is full: the earliest requests that fit keep
their replicas. A request that needs a block takes it from the newest later
one (as a scheduler preempts the newest); one that lost its replicas, or
never had room, takes them back with a full copy once there are enough free
blocks; one larger than the whole pool has none. Without replicas a request recomputes
on failure. Replicas are freed as soon as their sequence finishes, is
preempted or moves.

After a failure, the borrowed worker takes the failed worker's replicas over:
their blocks become live blocks of its pool, and the sequences recompute only
the tokens past their watermark."""
from __future__ import annotations

from kevlarflow.deploy.protocol import REPLICATION_TOTALS
from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.sequence import Sequence
from kevlarflow.replication import LINK_PREFIX
from kevlarflow.replication.links import Record, ReplicaLink


class Replication:
    """The controller's replication state; the controller and recovery call
    it at each event.

    send(worker, type, **fields) sends a control message to a worker (and
    drops it if the worker is gone); call_off(group, generation, members,
    reason) calls a generation off in the store; next_generation() numbers
    a new communicator generation."""

    def __init__(self, workers, pools: dict[str, BlockManager], replica_blocks: list[int],
                 block_size: int, block_bytes: list[int], send, call_off, next_generation):
        self.workers, self.pools = workers, pools
        self.replica_blocks = replica_blocks   # per stage
        self.block_size, self.block_bytes = block_size, block_bytes
        self._send, self._call_off, self._next_generation = send, call_off, next_generation
        self.enabled = any(replica_blocks)
        self.links: dict[str, ReplicaLink] = {}  # by source
        # Each stage's workers (slots) in ring order; the ring is over the ready ones.
        self.order = [[r.name for r in workers if r.stage == s] for s in range(len(replica_blocks))]
        self.reserve: dict[str, list[int]] = {}  # worker -> its blocks kept for replicas
        self.bytes_replicated = 0
        # The latest running totals of each worker process's replication, as
        # its heartbeats report them; a process that is gone keeps its last.
        self._totals: dict[tuple[str, int | None], dict] = {}

    # Membership ---------------------------------------------------------------------

    def new_pool(self, worker: str, pool: BlockManager) -> None:
        """A worker's fresh pool lends its replica blocks at once."""
        self.reserve[worker] = pool.lend(self.replica_blocks[self.workers[worker].stage])

    def ring(self) -> dict[str, str]:
        """source -> backup over the ready workers of each stage, in ring order."""
        ring = {}
        for order in self.order:
            live = [w for w in order if self.workers.ready(w)]
            if len(live) >= 2:
                ring.update({w: live[(k + 1) % len(live)] for k, w in enumerate(live)})
        return ring

    def reform(self) -> None:
        if not self.enabled:
            return
        ring = self.ring()
        for source, link in list(self.links.items()):
            if ring.get(source) != link.backup:
                self.close(source)
        for source, backup in ring.items():
            if source not in self.links:
                self._open(source, backup)

    def place_after(self, worker: str, lender: str) -> None:
        """worker's instance runs on lender at worker's stage: lender's
        replicas go to worker from the next reform on."""
        order = self.order[self.workers[worker].stage]
        order.remove(worker)
        order.insert(order.index(lender) + 1, worker)

    def _open(self, source: str, backup: str) -> None:
        want = self.replica_blocks[self.workers[backup].stage]
        reserve = self.reserve[backup]
        reserve += self.pools[backup].lend(want - len(reserve))  # refill what was taken over
        link = ReplicaLink(source, backup, self._next_generation(), list(reserve), self.block_size)
        self.links[source] = link
        for w in (source, backup):
            # Replicas travel through host memory (the replicator packs them
            # there), so a link is a Gloo group on any device.
            self._send(w, "build_group", group=link.group, members=[source, backup],
                       generation=link.generation, backend="gloo")

    def close(self, source: str) -> None:
        """Stop a link; live ends leave its group before anything else, and a
        build still under way is called off."""
        link = self.links.pop(source)
        for w in (link.source, link.backup):
            self._send(w, "leave_group", group=link.group)
        if not link.ready:
            self._call_off(link.group, link.generation, [link.source, link.backup], "link closed")
        for seq in list(link.records):
            link.forget(seq)

    def _link_of(self, group: str, generation: int) -> ReplicaLink | None:
        """The current link whose group and generation these are."""
        link = self.links.get(group[len(LINK_PREFIX):])
        return link if link is not None and link.generation == generation else None

    def link_failed(self, group: str, generation: int) -> None:
        """A link's build failed: it is built anew (a member that died
        meanwhile has left the ring by then)."""
        link = self._link_of(group, generation)
        if link is not None:
            self.close(link.source)
            self.reform()

    def group_ready(self, worker: str, group: str, generation: int) -> None:
        link = self._link_of(group, generation)
        if link is not None:
            link.acks.add(worker)

    def backup_of(self, worker: str) -> str | None:
        link = self.links.get(worker)
        return None if link is None else link.backup

    # Steps ----------------------------------------------------------------------------

    def pairs(self, worker: str, items, step: int) -> list[list[int]] | None:
        link = self.links.get(worker)
        if link is None or not link.ready:
            return None
        pool = self.pools[worker]
        pairs = [p for seq, n in items for p in link.plan(seq, n, pool.table(seq), step)]
        return pairs or None

    def acknowledged(self, m: dict) -> None:
        link = self._link_of(m["group"], m["generation"])
        if link is not None and link.backup == m["worker"]:
            before = link.rows_acked
            link.acknowledged(m["steps"])
            stage = self.workers[link.source].stage
            self.bytes_replicated += ((link.rows_acked - before) * self.block_bytes[stage]
                                      // self.block_size)

    def count(self, worker: str, pid: int | None, totals: dict) -> None:
        self._totals[worker, pid] = totals

    def totals(self) -> dict[str, float]:
        """Replication's work over every worker process so far (see
        WorkerReplication.totals), as of their last heartbeats."""
        out = dict.fromkeys(REPLICATION_TOTALS, 0)
        for totals in list(self._totals.values()):
            for k in out:
                out[k] += totals[k]
        return out

    def forget(self, seq: Sequence) -> None:
        for link in self.links.values():
            link.forget(seq)

    def forget_on(self, source: str, seq: Sequence) -> None:
        """seq's KV left worker source: its replicas from there are void."""
        link = self.links.get(source)
        if link is not None:
            link.forget(seq)

    def watermark(self, seq: Sequence, worker: str) -> int | None:
        """Tokens of seq durable at the backup of worker; None without a link."""
        link = self.links.get(worker)
        return None if link is None else link.watermark(seq)

    # Recovery -------------------------------------------------------------------------

    def take_over(self, old: str, new: str, seqs: list[Sequence]) -> dict[Sequence, int]:
        """Stage KV of seqs moves from worker old (dead, or given back) to new:
        new adopts the replicas it holds of old, and the link closes (its
        receiver stops before new runs another step). Returns the tokens of
        each sequence whose KV new now holds."""
        link = self.links.get(old)
        kept = {seq: 0 for seq in seqs}
        if link is None or link.backup != new:
            return kept
        pool = self.pools[new]
        taken = set()
        for seq in seqs:
            tokens = min(link.watermark(seq), seq.num_computed_tokens)
            blocks = link.take(seq, tokens) if tokens else []
            pool.adopt(seq, blocks)
            taken.update(blocks)
            kept[seq] = tokens
        self.reserve[new] = [b for b in self.reserve[new] if b not in taken]
        self.close(old)
        return kept

    def migration_links(self, inst) -> list[ReplicaLink] | None:
        """The links from each worker inst borrows to inst's own worker of
        that stage; None if some borrowed worker replicates elsewhere."""
        borrowed = [(own, now) for own, now in zip(inst.home, inst.workers) if own != now]
        links = [self.links.get(now) for _, now in borrowed]
        if all(link is not None and link.backup == own for link, (own, _) in zip(links, borrowed)):
            return links
        return None

    def flush(self, links: list[ReplicaLink]) -> None:
        """Their sources send what is pending now (an instance drains and
        waits for it)."""
        for link in links:
            self._send(link.source, "flush_replication")

    def caught_up(self, inst, links: list[ReplicaLink], among=None) -> bool:
        """Every running request of inst (of those `among`, if given) has KV at
        its own workers, and the copy of all it computed is under way: the
        rest is what its last steps wrote."""
        return all(link.ready for link in links) and not self.unplanned(inst, links) and all(
            link.watermark(seq) > 0 or link.records.get(seq, Record()).dropped
            for link in links for seq in inst.running() if among is None or seq in among)

    def unplanned(self, inst, links: list[ReplicaLink]) -> bool:
        """Some running request of inst computed KV that no step asked to copy
        (a step dispatched before the link was up): only its next step will."""
        return any(link.records.get(seq, Record()).sent < seq.num_computed_tokens
                   and not link.records.get(seq, Record()).dropped
                   for link in links for seq in inst.running())

    def durable(self, inst, links: list[ReplicaLink]) -> bool:
        """All KV of inst's running requests is at its own workers (but for
        requests whose replicas were dropped: waiting would not bring it)."""
        return all(link.ready for link in links) and self.behind(inst, links) == 0

    def behind(self, inst, links: list[ReplicaLink]) -> int:
        return sum(max(0, seq.num_computed_tokens - link.watermark(seq))
                   for link in links for seq in inst.running()
                   if not link.records.get(seq, Record()).dropped)

    def without_replicas(self, inst, links: list[ReplicaLink]) -> int:
        return sum(link.records.get(seq, Record()).dropped for link in links
                   for seq in inst.running())

    def kv_bytes(self, inst) -> int:
        """Bytes of KV of inst's running requests at the stages it borrows."""
        tokens = sum(seq.num_computed_tokens for seq in inst.running())
        return sum(tokens * self.block_bytes[s] // self.block_size
                   for s, (own, now) in enumerate(zip(inst.home, inst.workers)) if own != now)

    def lag(self, instances) -> list[int]:
        """Tokens computed but not yet durable at the backup, per sequence and
        link, over the running sequences of every instance."""
        lags = []
        for inst in instances:
            for worker in inst.workers:
                link = self.links.get(worker)
                if link is None:
                    continue
                for seq in inst.sequences:
                    if seq.num_computed_tokens and not link.records.get(seq, Record()).dropped:
                        lags.append(max(0, seq.num_computed_tokens - link.watermark(seq)))
        return lags
