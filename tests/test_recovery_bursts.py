"""Bursts of faults against recovery's state machine, in-process (see
helpers/recovery_deployment.py): hypothesis draws sequences of worker
failures, replacements that die before they register or join, builds and
replication links that come up or fail, communicator errors in a step,
steps (some left in flight across the faults, then answered if still
awaited), and time passing, on 2 x 2, 3 x 2 and 4 x 1 deployments, under
KevlarFlow's recovery and the restart baseline, with replacements that start
at once or after a delay. After every action the deployment is consistent;
once the faults stop and every replacement joins, every instance is back on
its own workers, serving, with all its requests, none of which failed."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.recovery_deployment import Deployment
from kevlarflow.deploy.workers import WorkerState
from kevlarflow.ft.phases import Phase

KINDS = ("lose", "die", "join", "connect", "links", "step", "send", "answer", "tick",
         "build_fails", "link_fails", "comm_error")
ACTIONS = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 5)), min_size=1, max_size=40)
ON_WORKERS = (Phase.SERVING, Phase.CATCHING_UP, Phase.DRAINING)


def _in_state(d, state: WorkerState) -> list[str]:
    return [n for n in d.workers.names() if d.workers[n].state is state]


def _step(d, i: int) -> None:
    if d.instances[i].can_dispatch():
        d.step(i)


def _answer(d) -> None:
    """The results of the steps in flight that are still awaited (the
    controller drops those of steps given up on)."""
    for i, inst in enumerate(d.instances):
        for step in list(inst.in_flight):
            d.complete(i, step)


def apply(d, kind: str, k: int) -> None:
    if kind == "lose":
        live = [n for n in d.workers.names() if d.workers[n].live]
        if live:
            d.lose(live[k % len(live)])
    elif kind == "die":  # a replacement's process exits before it registers
        starting = _in_state(d, WorkerState.STARTING)
        if starting:
            d.recovery.replacement_died(starting[k % len(starting)], "exited with code 1")
    elif kind == "join":
        starting = _in_state(d, WorkerState.STARTING)
        if starting:
            d.ready(starting[k % len(starting)])
    elif kind == "connect":
        d.connect(d.instances[k % len(d.instances)])
    elif kind == "links":
        d.links_up()
    elif kind == "step":
        _step(d, k % len(d.instances))
    elif kind == "send":
        if d.instances[k % len(d.instances)].can_dispatch():
            d.dispatch(k % len(d.instances))
    elif kind == "answer":
        _answer(d)
    elif kind == "build_fails":  # a member reports its build of the pipeline failed
        inst = d.instances[k % len(d.instances)]
        d.recovery.group_failed(inst, inst.generation, inst.workers[k % len(inst.workers)],
                                "connection reset")
    elif kind == "link_fails":
        links = sorted(d.replication.links.values(), key=lambda link: link.source)
        if links:
            link = links[k % len(links)]
            d.replication.link_failed(link.group, link.generation)
    elif kind == "comm_error":  # a step's send or receive failed, no worker known dead
        inst = d.instances[k % len(d.instances)]
        if inst.in_flight:
            d.recovery.comm_error(inst, inst.workers[-1], "peer closed the connection")
    else:
        d.clock.now += 0.25 * (k + 1)
        d.recovery.tick()


def check_consistent(d, requests) -> None:
    for inst in d.instances:
        assert [d.workers[w].stage for w in inst.workers] == list(range(len(inst.home)))
        if d.recovery.phase(inst) in ON_WORKERS:
            assert all(d.workers.ready(w) for w in inst.workers), (inst.index, inst.workers)
    assert not d.failed and not d.events.of("requests_failed")
    owners = [[i for i, inst in enumerate(d.instances) if seq in inst.sequences]
              for seq in requests]
    assert all(len(o) == 1 for o in owners), owners


def settle(d, rounds: int = 80) -> None:
    """No more faults: every replacement joins, every build and link comes
    up, the instances step, time passes."""
    for _ in range(rounds):
        for name in _in_state(d, WorkerState.STARTING):
            d.ready(name)
        for inst in d.instances:
            d.connect(inst)
        d.links_up()
        _answer(d)
        for i in range(len(d.instances)):
            _step(d, i)
        d.clock.now += 1.0
        d.recovery.tick()
        if all(d.recovery.phase(inst) is Phase.SERVING and inst.workers == inst.home
               for inst in d.instances) and not d.recovery.busy():
            return


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([(2, 2), (3, 2), (4, 1)]), st.sampled_from(["kevlarflow", "restart"]),
       st.sampled_from([0.0, 3.0]), ACTIONS)
def test_after_any_burst_of_faults_every_instance_gets_home_with_its_requests(
        topology, recovery, replacement_delay_s, actions):
    instances, stages = topology
    d = Deployment(num_instances=instances, pp_size=stages, recovery=recovery,
                   replacement_delay_s=replacement_delay_s, outage_timeout_s=1e6)
    d.start()
    requests = [d.add(i % instances) for i in range(2 * instances)]
    for i in range(instances):
        d.step(i)
    for kind, k in actions:
        apply(d, kind, k)
        check_consistent(d, requests)
    settle(d)
    check_consistent(d, requests)
    assert all(d.workers.ready(n) for n in d.workers.names())
    for inst in d.instances:
        assert d.recovery.phase(inst) is Phase.SERVING and inst.workers == inst.home, \
            [(e.kind, e.worker, e.instance, e.detail) for e in d.events.events][-12:]
    assert set(d.replication.ring()) == set(d.workers.names())
