"""Every transition of recovery's per-instance state machine (ft/phases.py),
in-process: the real Recovery, Replication, WorkerTable, pipeline instances
and block pools, driven as the controller drives them, with the controller's
outward actions (messages, processes) recorded instead of sent. Time is a
clock of the test's own."""
from __future__ import annotations

import pytest

from helpers.recovery_deployment import BLOCK, Deployment
from kevlarflow.deploy.config import DeploymentConfig
from kevlarflow.deploy.instance import PipelineInstance
from kevlarflow.deploy.workers import WorkerState
from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.params import SamplingParams
from kevlarflow.engine.sequence import Sequence
from kevlarflow.ft.phases import Phase


@pytest.fixture
def d():
    deployment = Deployment()
    deployment.start()
    return deployment


def test_start_up_loading_building_serving():
    d = Deployment()
    assert d.phase(0) is Phase.LOADING and not d.instances[0].accepting
    d.ready("w0.0")
    assert d.phase(0) is Phase.LOADING
    d.ready("w0.1")
    assert d.phase(0) is Phase.BUILDING and d.phase(1) is Phase.LOADING
    inst = d.instances[0]
    generation = inst.generation
    d.recovery.group_ready(inst, generation - 1, "w0.0")  # an older generation: ignored
    d.recovery.group_ready(inst, generation, "w0.0")
    assert d.phase(0) is Phase.BUILDING and inst.accepting and not inst.serving
    d.recovery.group_ready(inst, generation, "w0.1")
    assert d.phase(0) is Phase.SERVING and inst.serving


def test_a_failed_build_is_retried_after_a_backoff(d):
    inst = d.instances[0]
    d.lose("w1.1")  # instance 1 rebuilds on w0.1
    inst1 = d.instances[1]
    generation = inst1.generation
    d.recovery.group_failed(inst1, generation, "w1.0", "peer failure")
    assert d.phase(1) is Phase.BUILDING and (inst1.group, generation) in d.called_off
    assert inst1.generation == -1
    d.recovery.group_failed(inst1, generation, "w0.1", "peer failure")  # the same failure again
    d.recovery.tick()
    assert inst1.generation == -1  # still waiting out the backoff
    d.clock.now += 0.1
    d.recovery.tick()
    assert inst1.generation > generation and inst1.workers == ["w1.0", "w0.1"]
    d.connect(inst1)
    assert d.phase(1) is Phase.SERVING and d.phase(0) is Phase.SERVING
    assert inst.workers == inst.home


def test_a_build_past_its_deadline_is_called_off_and_retried(d):
    inst = d.instances[0]
    d.recovery.comm_error(inst, "w0.0", "peer failure")
    d.clock.now += 2.1
    d.recovery.tick()
    generation = inst.generation
    assert d.phase(0) is Phase.BUILDING
    d.clock.now += d.config.comm_deadline_s + 0.1
    d.recovery.tick()
    assert (inst.group, generation) in d.called_off
    d.clock.now += 0.1
    d.recovery.tick()
    assert inst.generation > generation
    d.connect(inst)
    assert d.phase(0) is Phase.SERVING


def test_a_comm_error_pauses_then_rebuilds_the_same_workers(d):
    inst = d.instances[0]
    seq = d.add(0)
    d.step(0)
    generation = inst.generation
    d.hold_step(0)
    d.recovery.comm_error(inst, "w0.1", "peer failure")
    assert d.phase(0) is Phase.PAUSED and not inst.serving and inst.accepting
    # The broken generation is aborted at once, its steps in flight given up.
    assert (inst.group, generation) in d.called_off and not inst.in_flight
    d.recovery.tick()
    assert d.phase(0) is Phase.PAUSED
    d.clock.now += 2.1
    d.recovery.tick()
    assert d.phase(0) is Phase.BUILDING and inst.workers == inst.home
    assert "rerouted" not in d.kinds() and seq.num_computed_tokens == 6  # KV kept


def test_a_failure_while_paused_reroutes(d):
    d.recovery.comm_error(d.instances[0], "w0.1", "peer failure")
    d.lose("w0.0")
    assert d.phase(0) is Phase.BUILDING and d.instances[0].workers == ["w1.0", "w0.1"]


def test_a_kill_reroutes_through_the_backup_and_keeps_replicated_kv(d):
    inst = d.instances[0]
    seqs = [d.add(0) for _ in range(3)]
    d.step(0)
    d.step(0, ack=False)  # the last token's KV is not yet at the backup
    assert all(s.num_computed_tokens == 7 for s in seqs)
    d.hold_step(0)  # a step in flight is given up on
    d.lose("w0.1")
    assert d.phase(0) is Phase.BUILDING and inst.workers == ["w0.0", "w1.1"]
    assert not inst.in_flight and d.spawned == ["w0.1"] and d.phase(1) is Phase.SERVING
    assert all(s.num_computed_tokens == 6 for s in seqs)  # durable: the 6 prompt tokens
    d.connect(inst)
    assert d.phase(0) is Phase.SERVING
    assert d.kinds()[-3:] == ["aborted", "rerouted", "resumed"]
    d.step(0)
    assert d.kinds()[-1] == "first_step_after_failure"


def test_the_lender_holds_its_steps_back_until_the_first_step_after_a_failure(d):
    """MTTR ends with the recovering instance's first step: the instance
    that lends it a worker starts no step of its own until that step is back,
    nor for longer than FIRST_STEP_PRIORITY_S; an instance that lends
    nothing is not held back."""
    from kevlarflow.ft.recovery import FIRST_STEP_PRIORITY_S

    recovering, lender = d.instances
    for i in (0, 1):
        d.add(i)
    d.lose("w0.1")
    assert not d.recovery.yields(lender)  # not resumed yet: nothing to wait for
    d.connect(recovering)
    assert recovering.workers == ["w0.0", "w1.1"] and d.recovery.yields(lender)
    assert not d.recovery.yields(recovering)
    step = d.dispatch(0)
    assert d.recovery.yields(lender)
    d.complete(0, step)
    assert d.kinds()[-1] == "first_step_after_failure" and not d.recovery.yields(lender)


def test_the_first_steps_after_a_failure_carry_the_interrupted_requests_only(d):
    """They end the stall of the requests the failure interrupted; a request
    that waits to be admitted would make them longer. It is admitted with
    the first step after them; one that arrives to an instance with nothing
    running is admitted at once."""
    recovering = d.instances[0]
    interrupted = [d.add(0), d.add(0)]
    d.step(0)
    d.lose("w0.1")
    d.connect(recovering)
    newcomer = d.add(0)
    first = d.dispatch(0)
    assert [s for s, _ in recovering.in_flight[first].batch.items] == interrupted
    d.complete(0, first)
    assert d.kinds()[-1] == "first_step_after_failure"
    assert newcomer in [s for s, _ in recovering.in_flight[d.dispatch(0)].batch.items]


def test_an_instance_with_nothing_running_admits_at_once_after_a_failure(d):
    recovering = d.instances[0]
    d.lose("w0.1")
    d.connect(recovering)
    newcomer = d.add(0)
    assert d.recovery.awaits_first_step(recovering)
    assert [s for s, _ in recovering.in_flight[d.dispatch(0)].batch.items] == [newcomer]


def test_a_fault_while_the_lender_holds_back_releases_it(d):
    """A fault during the hold: the borrowed worker dies before the
    recovering instance's first step is back. That instance builds again,
    and its lender, rerouted in turn, is not held back by it."""
    recovering, lender = d.instances
    for i in (0, 1):
        d.add(i)
    d.lose("w0.1")
    d.connect(recovering)
    d.dispatch(0)  # the first step, lost with the borrowed worker
    assert d.recovery.yields(lender)
    d.lose("w1.1")
    assert d.phase(0) is not Phase.SERVING
    assert not d.recovery.yields(lender) and not d.recovery.yields(recovering)


def test_micro_batches_in_flight_share_the_running_sequences():
    """With two micro-batches in flight, each takes half of the running
    sequences, even when all are free at once (after a failure): the stages
    then overlap instead of taking turns."""
    pools = [BlockManager(64, BLOCK, pool=f"w0.{s}") for s in range(2)]
    inst = PipelineInstance(0, ["w0.0", "w0.1"], pools, 64, 16, 2)
    seqs = []
    for i in range(5):
        seqs.append(Sequence(str(i), None, [1, 2, 3], SamplingParams(max_tokens=9)))
        inst.add(seqs[-1])
    first = inst.schedule()  # admission of waiting requests is not capped
    assert [s for s, _ in first.items] == seqs
    for seq, n in first.items:
        seq.num_computed_tokens += n
    a = inst.schedule()
    inst.busy.update(s for s, _ in a.items)
    b = inst.schedule()
    inst.busy.update(s for s, _ in b.items)
    assert [s for s, _ in a.items] == seqs[:3] and [s for s, _ in b.items] == seqs[3:]
    assert not inst.schedule()
    # A lone sequence is still scheduled.
    inst.busy.clear()
    for seq in seqs[1:]:
        inst.scheduler.finish(seq)
    assert [s for s, _ in inst.schedule().items] == seqs[:1]


def test_the_lender_holds_back_for_a_bounded_time_only(d):
    from kevlarflow.ft.recovery import FIRST_STEP_PRIORITY_S

    recovering, lender = d.instances
    d.add(0)
    d.lose("w0.1")
    d.connect(recovering)
    d.dispatch(0)  # the first step, which does not come back
    d.clock.now += FIRST_STEP_PRIORITY_S - 0.01
    assert d.recovery.yields(lender)
    d.clock.now += 0.02
    assert not d.recovery.yields(lender)


def _lose_stage_1(d):
    """A request with KV in instance 0; then both stage-1 workers die, the
    borrowed one while instance 0's rebuild is under way."""
    seq = d.add(0)
    d.step(0)
    d.lose("w0.1")
    assert d.phase(0) is Phase.BUILDING
    d.lose("w1.1")
    assert d.phase(0) is Phase.DOWN and d.phase(1) is Phase.DOWN
    return seq


def test_both_workers_of_a_stage_lost_hold_requests_until_one_joins(d):
    seq = _lose_stage_1(d)
    # Stage 1's KV is gone everywhere: the request waits to recompute from scratch.
    assert not d.failed and seq in d.instances[0].sequences
    assert seq.num_computed_tokens == 0 and seq in d.instances[0].scheduler.waiting
    assert d.pools["w0.0"].num_free_blocks == d.pools["w0.0"].num_blocks - 32  # but replicas
    assert d.recovery.stats.tokens_recomputed == 0  # not yet: it may time out instead
    held = d.events.of("requests_held")
    assert [e.instance for e in held] == [0] and "at most 30 s" in held[0].detail
    assert all(inst.accepting and not inst.serving for inst in d.instances)
    d.clock.now += d.config.outage_timeout_s - 0.1
    d.recovery.tick()
    assert not d.failed and d.phase(0) is Phase.DOWN
    d.ready("w1.1")  # a replacement of w1.1 joins first: both can run on it
    assert d.phase(0) is Phase.BUILDING and d.instances[0].workers == ["w0.0", "w1.1"]
    assert d.recovery.stats.tokens_recomputed == 6  # the 6 tokens of KV it had
    assert d.phase(1) is Phase.BUILDING and d.instances[1].workers == ["w1.0", "w1.1"]
    d.clock.now += 1.0  # past the outage timeout: nothing is DOWN any more
    d.recovery.tick()
    assert not d.failed
    d.connect(d.instances[0])
    d.step(0)  # the prompt and the token it had, again, in one step
    assert seq.num_computed_tokens == 7 and len(seq.output_token_ids) == 2


def test_a_worker_lost_again_as_the_outage_ends_counts_the_lost_kv_once(d):
    seq = _lose_stage_1(d)
    d.ready("w1.1")  # the outage ends: both rebuild on it
    assert d.phase(0) is Phase.BUILDING and d.recovery.stats.tokens_recomputed == 6
    d.lose("w1.1")  # and it fails before the build completes: down again
    assert d.phase(0) is Phase.DOWN and seq in d.instances[0].sequences
    d.ready("w0.1")
    assert d.phase(0) is Phase.BUILDING and d.recovery.stats.tokens_recomputed == 6
    d.connect(d.instances[0])
    d.step(0)
    assert seq.num_computed_tokens == 7


def test_an_outage_longer_than_its_timeout_fails_requests_and_refuses_new_ones(d):
    seq = _lose_stage_1(d)
    d.lose("w1.0")
    d.clock.now += 10.0
    d.ready("w1.0")  # a worker of another stage joins: stage 1 still has none
    assert d.phase(0) is Phase.DOWN and not d.failed  # the outage's deadline stands
    d.clock.now += d.config.outage_timeout_s - 10.0
    d.recovery.tick()
    assert not d.failed
    d.clock.now += 0.01
    d.recovery.tick()
    assert d.failed == [seq.request_id]
    assert not any(inst.accepting for inst in d.instances)
    d.ready("w0.1")
    assert d.phase(0) is Phase.BUILDING and d.instances[0].accepting
    assert d.recovery.stats.tokens_recomputed == 0  # the failed request recomputes nothing


def test_with_no_outage_timeout_requests_fail_at_once():
    d = Deployment(outage_timeout_s=0.0)
    d.start()
    seq = _lose_stage_1(d)
    assert d.failed == [seq.request_id] and not d.instances[0].accepting
    assert "requests_held" not in d.kinds()
    d.ready("w1.1")
    assert d.phase(0) is Phase.BUILDING and d.instances[0].accepting


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), "30"])
def test_the_outage_timeout_is_a_finite_number_of_seconds(bad):
    with pytest.raises(ValueError, match="outage_timeout_s must be a finite number"):
        DeploymentConfig(num_instances=2, outage_timeout_s=bad).validate()


def _borrowing(d):
    """Instance 0 runs on w1.1 after w0.1 died; its replacement is ready."""
    seqs = [d.add(0) for _ in range(2)]
    d.step(0)
    d.lose("w0.1")
    inst = d.instances[0]
    d.connect(inst)
    d.step(0)
    d.ready("w0.1")
    d.links_up()  # the ring now has w1.1 -> w0.1
    return inst, seqs


def test_a_rejoin_catches_up_drains_and_moves_without_recompute(d):
    inst, seqs = _borrowing(d)
    assert d.phase(0) is Phase.CATCHING_UP and inst.serving
    d.step(0)  # the first copy of its KV reaches w0.1
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING and not inst.serving and inst.accepting
    d.hold_step(0)
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING  # a step still in flight
    inst.in_flight.clear()
    d.recovery.tick()
    assert d.phase(0) is Phase.BUILDING and inst.workers == inst.home
    rejoined = d.events.of("rejoined")[-1]
    assert rejoined.detail == "2 requests keep 16 tokens of KV, recompute 0"
    assert all(s.num_computed_tokens == 8 for s in seqs)


def test_with_three_instances_the_borrowed_worker_replicates_to_the_replacement():
    """With three instances, the worker instance 0 borrows (w1.1) replicates
    to w2.1 in instance order, not to instance 0's replacement: the
    replacement joins the ring right after w1.1, so that the move back still
    finds every request's KV there. The ring keeps that order afterwards."""
    d = Deployment(num_instances=3)
    d.start()
    assert d.replication.ring() == {"w0.1": "w1.1", "w1.1": "w2.1", "w2.1": "w0.1",
                                    "w0.0": "w1.0", "w1.0": "w2.0", "w2.0": "w0.0"}
    inst, seqs = _borrowing(d)
    assert inst.workers == ["w0.0", "w1.1"]
    assert d.replication.ring()["w1.1"] == "w0.1" and d.replication.ring()["w0.1"] == "w2.1"
    assert d.phase(0) is Phase.CATCHING_UP
    d.step(0)
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING
    d.recovery.tick()
    assert d.phase(0) is Phase.BUILDING and inst.workers == inst.home
    assert d.events.of("rejoined")[-1].detail == "2 requests keep 16 tokens of KV, recompute 0"
    assert all(s.num_computed_tokens == 8 for s in seqs)
    assert d.replication.ring() == {"w1.1": "w0.1", "w0.1": "w2.1", "w2.1": "w1.1",
                                    "w0.0": "w1.0", "w1.0": "w2.0", "w2.0": "w0.0"}


def _two_borrowing_w1_1(d):
    """Instances 0 and 2 lose their stage-1 workers and both run on w1.1."""
    d.start()
    inst0, inst2 = d.instances[0], d.instances[2]
    seqs = [d.add(0), d.add(2)]
    d.step(0), d.step(2)
    d.lose("w0.1")
    d.connect(inst0)
    d.lose("w2.1")
    d.connect(inst2)
    assert inst0.workers == ["w0.0", "w1.1"] and inst2.workers == ["w2.0", "w1.1"]
    d.step(0), d.step(2)
    return inst0, inst2, seqs


def _move_back(d, i):
    """Instance i catches up, drains and rejoins its own workers; their
    communicator comes up."""
    inst = d.instances[i]
    d.links_up()
    d.step(i)
    d.recovery.tick()
    assert d.phase(i) is Phase.DRAINING
    d.recovery.tick()
    assert d.phase(i) is Phase.BUILDING and inst.workers == inst.home
    assert d.events.of("rejoined")[-1].detail.endswith("recompute 0"), d.events.of("rejoined")
    d.connect(inst)


def test_two_instances_borrowing_one_worker_both_move_back_through_its_replicas():
    """Instances 0 and 2 both run on w1.1. Instance 0's replacement joins
    first and catches up through w1.1's replicas; instance 2's, joining
    meanwhile, does not take that link away (a worker has one backup): it
    goes on serving on w1.1, and once instance 0 is back, w1.1 replicates to
    it and it moves back in turn, neither recomputing a token."""
    d = Deployment(num_instances=3)
    inst0, inst2, seqs = _two_borrowing_w1_1(d)
    d.ready("w0.1")
    d.links_up()
    assert d.phase(0) is Phase.CATCHING_UP and d.replication.ring()["w1.1"] == "w0.1"
    d.ready("w2.1")
    d.links_up()
    assert d.replication.ring()["w1.1"] == "w0.1"
    assert d.phase(0) is Phase.CATCHING_UP
    assert d.phase(2) is Phase.SERVING and inst2.workers == ["w2.0", "w1.1"]
    d.step(2)  # it serves while it waits
    d.recovery.tick()
    assert d.phase(2) is Phase.SERVING and d.replication.ring()["w1.1"] == "w0.1"
    _move_back(d, 0)
    assert seqs[0].num_computed_tokens == 8
    d.recovery.tick()  # instance 0 is back: w1.1 replicates to instance 2's own worker
    assert d.replication.ring()["w1.1"] == "w2.1" and d.phase(2) is Phase.CATCHING_UP
    _move_back(d, 2)
    assert seqs[1].num_computed_tokens == 9
    assert not d.events.of("requests_failed") and len(d.events.of("rejoined")) == 2


def test_an_instance_not_yet_moving_back_does_not_keep_the_lender_s_backup():
    """Instance 0's stage-1 replacement is ready but its stage-0 one is not,
    so it cannot move back yet: instance 2, whose replacement is ready, takes
    w1.1's replicas and moves back first; instance 0 follows through them."""
    d = Deployment(num_instances=3)
    inst0, inst2, _ = _two_borrowing_w1_1(d)
    d.lose("w0.0")  # instance 0 reroutes to w1.0 at stage 0
    d.connect(inst0)
    assert inst0.workers == ["w1.0", "w1.1"]
    d.ready("w0.1")
    d.links_up()
    assert d.phase(0) is Phase.SERVING and d.replication.ring()["w1.1"] == "w0.1"
    d.ready("w2.1")
    assert d.replication.ring()["w1.1"] == "w2.1" and d.phase(2) is Phase.CATCHING_UP
    d.ready("w0.0")  # instance 0 could move back now, but w1.1 replicates to instance 2's
    assert d.phase(0) is Phase.SERVING
    _move_back(d, 2)
    d.recovery.tick()
    assert d.replication.ring()["w1.1"] == "w0.1" and d.phase(0) is Phase.CATCHING_UP
    _move_back(d, 0)
    assert not d.events.of("requests_failed") and len(d.events.of("rejoined")) == 2


def test_a_drain_has_the_last_replicas_sent_once_its_steps_are_back(d):
    """What the drain waits for is the KV of the steps it let finish: the
    borrowed worker sends it as soon as the last of them is back, not at
    its next replication interval."""
    inst, seqs = _borrowing(d)
    flushes = lambda: [to for to, kind, _ in d.sent if kind == "flush_replication"]  # noqa: E731
    step = d.dispatch(0)
    d.complete(0, step)
    d.hold_step(0)
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING and flushes() == []  # a step still in flight
    d.complete(0, next(iter(inst.in_flight)), ack=False)
    assert flushes() == ["w1.1"]


def test_requests_admitted_while_catching_up_are_left_to_the_drain(d):
    """The catch-up copies the KV of the requests running when it began; one
    admitted meanwhile, whose first copy is not back yet, does not hold it
    (with requests arriving all the time, some always would): the drain,
    which admits nothing, waits for its copy."""
    inst, seqs = _borrowing(d)
    assert d.phase(0) is Phase.CATCHING_UP
    old = d.dispatch(0)
    newcomer = d.add(0)
    new = d.dispatch(0)
    assert [s for s, _ in inst.in_flight[new].batch.items] == [newcomer]
    d.complete(0, old)
    d.complete(0, new, ack=False)
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING  # the newcomer's copy is not acknowledged yet
    for link in d.replication.links.values():
        d.replication.acknowledged(dict(group=link.group, generation=link.generation,
                                        worker=link.backup, steps=[new]))
    d.recovery.tick()
    assert d.phase(0) is Phase.BUILDING and inst.workers == inst.home
    assert d.events.of("rejoined")[-1].detail == "3 requests keep 22 tokens of KV, recompute 0"


def test_kv_computed_before_the_link_was_up_sends_the_drain_back_to_catch_up(d):
    """A step dispatched before the link to the replacement was up comes
    back during the drain: no step has asked to copy that KV, so waiting
    cannot bring it; the instance catches up again (one more step of the
    request asks) and then moves without recomputing."""
    seqs = [d.add(0) for _ in range(2)]
    d.step(0)
    d.lose("w0.1")
    inst = d.instances[0]
    d.connect(inst)
    d.ready("w0.1")  # its link is not up yet: nothing is planned for copy
    others = d.dispatch(0)
    late = d.add(0, prompt_len=9)
    early = d.dispatch(0)  # late's prefill alone
    d.complete(0, others)
    d.links_up()
    assert d.phase(0) is Phase.CATCHING_UP
    d.recovery.tick()
    assert d.phase(0) is Phase.CATCHING_UP  # the others' KV is not copied yet
    d.step(0)  # the others again (late is in flight), now with the link up
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING
    d.complete(0, early, ack=False)
    d.recovery.tick()
    assert d.phase(0) is Phase.CATCHING_UP and late.num_computed_tokens == 9
    d.step(0)
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING
    d.recovery.tick()
    assert d.phase(0) is Phase.BUILDING and inst.workers == inst.home
    assert d.events.of("rejoined")[-1].detail.endswith("recompute 0")


def test_a_replacement_lost_while_catching_up_keeps_the_borrowed_worker(d):
    inst, _ = _borrowing(d)
    assert d.phase(0) is Phase.CATCHING_UP
    d.lose("w0.1")
    assert d.phase(0) is Phase.SERVING and inst.workers == ["w0.0", "w1.1"]
    assert d.spawned == ["w0.1", "w0.1"]


def test_the_borrowed_worker_lost_while_draining_moves_home_from_replicas(d):
    inst, seqs = _borrowing(d)
    d.step(0)
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING
    d.lose("w1.1")
    assert d.phase(0) is Phase.BUILDING and inst.workers == inst.home
    assert d.events.of("rejoined")[-1].detail.endswith("recompute 0")
    assert d.phase(1) is Phase.BUILDING and d.instances[1].workers == ["w1.0", "w0.1"]


def test_a_drain_past_its_deadline_moves_and_says_why(d):
    inst, _ = _borrowing(d)
    d.step(0)
    d.step(0, ack=False)  # its KV never arrives
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING
    d.recovery.tick()
    assert d.phase(0) is Phase.DRAINING
    d.clock.now += 60
    d.recovery.tick()
    assert d.phase(0) is Phase.BUILDING and inst.workers == inst.home
    assert d.events.of("rejoined")[-1].detail == (
        "2 requests keep 16 tokens of KV, recompute 2: the copy deadline passed with 2 tokens "
        "not yet at its own workers")


def test_without_a_link_the_rejoin_recomputes_and_says_why():
    d = Deployment(replica_blocks=0)
    d.start()
    inst, seqs = _borrowing(d)
    assert d.phase(0) is Phase.BUILDING and inst.workers == inst.home
    detail = d.events.of("rejoined")[-1].detail
    assert detail == "2 requests keep 0 tokens of KV, recompute 14: no replication link to its " \
                     "own worker", detail


def test_restart_baseline_replaces_the_whole_instance():
    d = Deployment(recovery="restart")
    d.start()
    seq = d.add(0)
    d.step(0)
    d.lose("w0.1")
    assert d.phase(0) is Phase.RESTARTING and not d.instances[0].accepting
    assert sorted(d.spawned) == ["w0.0", "w0.1"] and seq.num_computed_tokens == 0
    assert d.workers["w0.0"].state is WorkerState.STARTING
    d.workers.register(d.workers["w0.0"], b"x", 2, "host")
    d.lose("w0.0")  # a replacement dies while it loads
    assert d.phase(0) is Phase.RESTARTING and d.spawned.count("w0.0") == 1  # after its backoff
    d.clock.now += 1
    d.recovery.tick()
    assert d.spawned.count("w0.0") == 2
    d.ready("w0.0")
    d.ready("w0.1")
    assert d.phase(0) is Phase.BUILDING and d.kinds()[-1] == "rejoined"


def test_a_comm_error_of_one_pipeline_pauses_only_that_one(d):
    """Instance 0 borrows w1.1; a step of instance 0 fails at w1.1 (its
    stage-0 peer died): instance 1, which w1.1 also serves, goes on."""
    d.lose("w0.1")
    d.connect(d.instances[0])
    d.recovery.comm_error(d.instances[0], "w1.1", "peer failure")
    assert d.phase(0) is Phase.PAUSED and d.phase(1) is Phase.SERVING


def test_faults_in_two_instances_at_once(d):
    d.add(0), d.add(1)
    d.step(0), d.step(1)
    d.lose("w0.0")
    d.lose("w1.1")
    assert d.instances[0].workers == ["w1.0", "w0.1"]
    assert d.instances[1].workers == ["w1.0", "w0.1"]
    assert d.phase(0) is Phase.BUILDING and d.phase(1) is Phase.BUILDING
    for inst in d.instances:
        d.connect(inst)
    assert d.phase(0) is Phase.SERVING and d.phase(1) is Phase.SERVING


def test_a_replacement_that_dies_loading_is_replaced_with_backoff(d):
    d.lose("w0.1")
    d.connect(d.instances[0])
    record = d.workers["w0.1"]
    d.workers.register(record, b"x", 2, "host")  # registered, loading
    d.lose("w0.1", "no heartbeat")
    assert d.phase(0) is Phase.SERVING and d.spawned == ["w0.1"]
    d.clock.now += 0.5
    d.recovery.tick()
    assert d.spawned == ["w0.1", "w0.1"]
    d.recovery.replacement_died("w0.1", "exited with code 1")  # before registering
    d.clock.now += 0.5
    d.recovery.tick()
    assert d.spawned == ["w0.1", "w0.1"]  # the third waits 1 s
    d.clock.now += 0.6
    d.recovery.tick()
    assert d.spawned == ["w0.1"] * 3
    d.ready("w0.1")
    assert not d.recovery.replacements.pending()


@pytest.mark.parametrize("recovery", ["kevlarflow", "restart"])
def test_replacements_wait_out_the_replacement_delay_in_both_modes(recovery):
    """A cluster provisions a node before a failed slot's process can start:
    both recovery modes wait for it alike, and a replacement that dies waits
    for it again, plus its backoff."""
    d = Deployment(recovery=recovery, replacement_delay_s=30.0)
    d.start()
    d.lose("w0.1")
    assert d.spawned == []
    d.clock.now += 29.9
    d.recovery.tick()
    assert d.spawned == []
    d.clock.now += 0.2
    d.recovery.tick()
    assert "w0.1" in d.spawned
    count = d.spawned.count("w0.1")
    d.recovery.replacement_died("w0.1", "exited with code 1")
    d.clock.now += 30.4
    d.recovery.tick()
    assert d.spawned.count("w0.1") == count  # 30 s and a backoff of 0.5 s
    d.clock.now += 0.2
    d.recovery.tick()
    assert d.spawned.count("w0.1") == count + 1


def test_a_fault_during_a_build_calls_the_build_off(d):
    d.lose("w0.1")
    inst = d.instances[0]
    generation = inst.generation
    d.lose("w0.0")  # a member of the build under way
    assert (inst.group, generation) in d.called_off
    assert d.phase(0) is Phase.BUILDING and inst.workers == ["w1.0", "w1.1"]
    d.recovery.group_ready(inst, generation, "w1.1")  # the old build's late ack: ignored
    assert d.recovery.states[0].acks == set()
