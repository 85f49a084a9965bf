"""The controller's replication and reroute planning, in-process, no workers:
which worker backs which up (the ring), what a step asks to copy, watermark
arithmetic, a full replica pool, where an instance runs after a failure and
what its requests keep of their KV."""
import itertools

from kevlarflow.deploy.instance import PipelineInstance
from kevlarflow.deploy.workers import WorkerState, WorkerTable
from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.params import SamplingParams
from kevlarflow.engine.sequence import Sequence
from kevlarflow.ft.reroute import move_kv, plan_route
from kevlarflow.replication.controller import Replication
from kevlarflow.replication.links import ReplicaLink

BS = 4


def _seq(rid: str, prompt_len: int) -> Sequence:
    return Sequence(rid, None, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8))


def test_a_step_copies_the_rows_it_writes_and_the_history_the_first_time():
    link = ReplicaLink("w0.0", "w1.0", 0, ids=[40, 41, 42, 43, 44, 45], block_size=BS)
    seq = _seq("a", 10)
    seq.num_computed_tokens = 6  # computed before the link existed
    table = [7, 8, 9, 10]
    # tokens 0..9: blocks 0 and 1 whole, then rows 0 and 1 of block 2
    assert link.plan(seq, 4, table, step=1) == [[7, 40, 0, 4], [8, 41, 0, 4], [9, 42, 0, 2]]
    seq.num_computed_tokens = 10
    assert link.plan(seq, 1, table, step=2) == [[9, 42, 2, 3]]  # token 10: the row it writes
    assert link.watermark(seq) == 0
    link.acknowledged([2])  # a later step first: durable up to its end
    assert link.watermark(seq) == 11
    link.acknowledged([1])  # an older one never lowers it
    assert link.watermark(seq) == 11
    assert (link.rows_sent, link.rows_acked) == (11, 11)  # each row once


def test_a_full_replica_pool_drops_the_late_sequence_and_keeps_the_early_ones():
    link = ReplicaLink("w0.0", "w1.0", 0, ids=[40, 41, 42], block_size=BS)
    early, late = _seq("early", 8), _seq("late", 8)
    early.arrival_time, late.arrival_time = 1.0, 2.0
    assert len(link.plan(early, 8, [1, 2], step=1)) == 2
    assert link.plan(late, 8, [3, 4], step=1) == []  # one replica block left, two needed
    link.acknowledged([1])
    assert link.watermark(early) == 8 and link.watermark(late) == 0
    assert link.records[late].dropped and link.dropped == 1
    late.num_computed_tokens = 8
    assert link.plan(late, 1, [3, 4, 5], step=2) == []  # dropped until it ends
    assert link.take(early, 8) == [40, 41] and link.watermark(early) == 0


def test_an_early_sequence_that_grows_takes_the_replicas_of_the_newest_one():
    link = ReplicaLink("w0.0", "w1.0", 0, ids=[40, 41, 42, 43], block_size=BS)
    early, mid, late, latest = (_seq(rid, n) for rid, n in
                                (("early", 4), ("mid", 4), ("late", 8), ("latest", 8)))
    for k, seq in enumerate((early, mid, late, latest)):
        seq.arrival_time = float(k)
    assert link.plan(early, 4, [1], step=1) == [[1, 40, 0, 4]]
    assert link.plan(mid, 4, [2], step=1) == [[2, 41, 0, 4]]
    assert link.plan(late, 8, [3, 4], step=1) == [[3, 42, 0, 4], [4, 43, 0, 4]]  # pool full
    link.acknowledged([1])
    early.num_computed_tokens = 4
    # early needs a second block: late, the newest, gives its replicas up.
    assert link.plan(early, 1, [1, 5], step=2) == [[5, 43, 0, 1]]
    assert link.records[late].dropped and link.dropped == 1 and link.watermark(late) == 0
    assert link.watermark(mid) == 4 and not link.records[mid].dropped
    # A newer one takes nothing from those before it.
    assert link.plan(latest, 8, [6, 7], step=2) == []
    assert link.records[latest].dropped and link.dropped == 2
    link.acknowledged([2])
    assert link.watermark(early) == 5 and link.watermark(mid) == 4


def test_a_request_that_lost_its_replicas_takes_them_back_with_a_full_copy_once_it_fits():
    link = ReplicaLink("w0.0", "w1.0", 0, ids=[40, 41, 42], block_size=BS)
    early, late = _seq("early", 8), _seq("late", 4)
    early.arrival_time, late.arrival_time = 1.0, 2.0
    assert link.plan(early, 8, [1, 2], step=1) == [[1, 40, 0, 4], [2, 41, 0, 4]]
    assert link.plan(late, 4, [3], step=1) == [[3, 42, 0, 4]]
    early.num_computed_tokens, late.num_computed_tokens = 8, 4
    # early grows into late's block before step 1 is acknowledged.
    assert link.plan(early, 1, [1, 2, 5], step=2) == [[5, 42, 0, 1]]
    assert link.records[late].dropped
    link.forget(early)  # early ends: its blocks are free again
    # late takes replicas back: all its blocks are copied anew.
    pairs = link.plan(late, 1, [3, 6], step=3)
    assert pairs == [[3, 42, 0, 4], [6, 41, 0, 1]] and not link.records[late].dropped
    link.acknowledged([1, 2])  # of copies made before it lost them: they count for nothing
    assert link.watermark(late) == 0
    link.acknowledged([3])
    assert link.watermark(late) == 5


def _workers(ready: set[str], instances=3, stages=2) -> WorkerTable:
    table = WorkerTable(instances, stages)
    for record in table:
        record.enter(WorkerState.READY if record.name in ready else WorkerState.EMPTY)
    return table


def test_the_ring_runs_over_ready_workers_of_each_stage_in_instance_order():
    workers = _workers({"w0.0", "w1.0", "w2.0", "w0.1", "w2.1"})
    rep = Replication(workers, {}, [8, 8], BS, [64, 64], None, None, itertools.count().__next__)
    assert rep.ring() == {"w0.0": "w1.0", "w1.0": "w2.0", "w2.0": "w0.0",
                          "w0.1": "w2.1", "w2.1": "w0.1"}
    alone = Replication(_workers({"w0.0"}, 2, 1), {}, [8], BS, [64], None, None, None)
    assert alone.ring() == {}  # nobody to back up to


def test_a_route_keeps_own_workers_then_the_borrowed_one_then_the_backup():
    ready = {"w0.0", "w1.1", "w2.1", "w1.0"}.__contains__
    lenders = [["w1.0", "w2.0"], ["w1.1", "w2.1"]]
    home = ["w0.0", "w0.1"]
    # Own worker of stage 0 is ready; stage 1 goes to the failed worker's backup.
    route, missing = plan_route(home, home, ready, {"w0.1": "w2.1"}.get, lenders)
    assert route == ["w0.0", "w2.1"] and missing is None
    # Already borrowing w1.1, which is ready: it stays (no KV to move).
    route, _ = plan_route(home, ["w0.0", "w1.1"], ready, {"w1.1": "w2.1"}.get, lenders)
    assert route == ["w0.0", "w1.1"]
    # Without a backup, the first ready lender; with none ready, the stage that lacks one.
    route, _ = plan_route(home, home, ready, lambda w: None, lenders)
    assert route == ["w0.0", "w1.1"]
    route, missing = plan_route(home, home, {"w0.0"}.__contains__, lambda w: None, lenders)
    assert route is None and missing == 1


def test_moving_kv_adopts_the_backups_replicas_and_rewinds_to_what_every_stage_kept():
    pools = {name: BlockManager(16, BS, pool=name) for name in ("w0.0", "w0.1", "w1.1")}
    workers = _workers({"w0.0", "w0.1", "w1.1"}, instances=2)
    rep = Replication(workers, pools, [0, 8], BS, [64, 64], lambda *a, **k: None,
                      lambda *a: None, itertools.count().__next__)
    for name, pool in pools.items():
        rep.new_pool(name, pool)
    inst = PipelineInstance(0, ["w0.0", "w0.1"], [pools["w0.0"], pools["w0.1"]], 64, 8, 2)
    seq = _seq("a", 10)
    inst.add(seq)
    batch = inst.schedule()
    rep.reform()
    link = rep.links["w0.1"]
    link.acks.update({"w0.1", "w1.1"})
    rep.pairs("w0.1", batch.items, step=1)
    seq.num_computed_tokens = 10
    rep.acknowledged(dict(group=link.group, generation=link.generation, worker="w1.1", steps=[1]))
    seq.output_token_ids.append(3)
    rep.pairs("w0.1", inst.schedule().items, step=2)  # token 10: not acknowledged
    seq.num_computed_tokens = 11
    moves = {}
    move = move_kv(inst, ["w0.0", "w1.1"], pools, rep, lambda rid, c, k: moves.update({rid: (c, k)}))
    assert moves == {"a": (11, 10)} and (move.restored, move.recomputed) == (10, 1)
    assert seq.num_computed_tokens == 10 and inst.workers == ["w0.0", "w1.1"]
    assert pools["w1.1"].table(seq) == link.ids[:3]  # the replicas are its blocks now
    assert pools["w0.1"].table(seq) == [] and "w0.1" not in rep.links
