"""Faults that arrive while a recovery is still under way, with real worker
processes and real signals, under load: a member of a communicator being
built hangs, the replacement fails while the instance moves back to it, the
borrowed worker fails while the KV moves back, a replacement hangs while it
loads, two instances are hit at once. Every request ends with the tokens of
a failure-free run, the streams are checked token by token, and every slot
ends on its own worker."""
import os
import signal
import time

import pytest

from helpers.failover import ARGS, Streams, workload
from kevlarflow import LLM
from kevlarflow.deploy.workers import WorkerState
from kevlarflow.ft.phases import Phase
from helpers.models import tiny_model

# Transfers after every step: replicas lag a token or two behind.
ARGS = dict(ARGS, replication_interval_s=0)


@pytest.fixture(scope="module")
def expected():
    prompts, params = workload()
    with LLM(tiny_model(), **{k: v for k, v in ARGS.items()
                              if k not in ("hang_timeout_s", "replication_interval_s")}) as llm:
        return [o.token_ids for o in llm.generate(prompts, params)]


def _long_workload():
    """Requests that are still running when a replacement has loaded
    (below the ~120 tokens where the tiny model's near-ties flip)."""
    prompts, params = workload(4)
    for p in params:
        p.max_tokens = 100
    return prompts, params


def _reference(prompts, params):
    with LLM(tiny_model(), **{k: v for k, v in ARGS.items()
                              if k not in ("hang_timeout_s", "replication_interval_s")}) as llm:
        return [o.token_ids for o in llm.generate(prompts, params)]


def _phase(engine, i):
    return engine.recovery.phase(engine.instances[i])


def _all_home(engine):
    return all(engine.recovery.phase(i) is Phase.SERVING and i.workers == i.home
               for i in engine.instances)


def _start(llm, prompts, params, tokens=2):
    engine = llm.engine
    streams = Streams(engine)
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    streams.until(lambda: all(len(s.output_token_ids) >= tokens for s in seqs), "tokens")
    return engine, streams, seqs


def test_a_member_of_the_build_under_way_hangs(expected):
    """w0.1 dies and instance 0 starts building on [w0.0, w1.1]; w0.0 is
    stopped before it can connect, so the build cannot complete: it is
    called off when the hang is detected, and the instance builds again on
    [w1.0, w1.1], its KV from the replicas of both failed workers."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2, **ARGS) as llm:
        engine, streams, seqs = _start(llm, prompts, params)
        engine.inject_fault(0, 1, "kill")
        engine.inject_fault(0, 0, "hang")  # before the controller saw the kill
        streams.until(lambda: engine.events.of("rerouted"), "the first reroute")
        assert _phase(engine, 0) is Phase.BUILDING
        streams.finish()
        assert streams.tokens(seqs) == expected
        reroutes = [e.detail.split(";")[0] for e in engine.events.of("rerouted")]
        assert reroutes[:2] == ["w0.0 -> w1.1", "w1.0 -> w1.1"], reroutes
        streams.until(lambda: _all_home(engine), "both replacements")
        assert [o.token_ids for o in llm.generate(prompts[:3], params[:3])] == expected[:3]


@pytest.mark.parametrize("second", ["replacement", "borrowed"])
def test_a_fault_while_the_instance_moves_back(second):
    """Instance 0 lost w0.1, borrows w1.1, and is moving back to w0.1's
    replacement (its KV being copied there) when a second worker dies:
    - the replacement: instance 0 stays on w1.1, a new replacement comes;
    - w1.1, the borrowed worker: the replacement holds replicas of all w1.1
      computed for instance 0, which moves home from them, and instance 1
      reroutes onto the replacement."""
    prompts, params = _long_workload()
    want = _reference(prompts, params)
    with LLM(tiny_model(), num_instances=2, pp_size=2, **ARGS) as llm:
        engine, streams, seqs = _start(llm, prompts, params)
        engine.inject_fault(0, 1, "kill")
        streams.until(lambda: _phase(engine, 0) in (Phase.CATCHING_UP, Phase.DRAINING),
                      "the move back")
        if second == "replacement":
            engine.inject_fault(0, 1, "kill")
            streams.until(lambda: len(engine.events.of("detected")) == 2, "the second failure")
            assert _phase(engine, 0) is Phase.SERVING
            assert engine.instances[0].workers == ["w0.0", "w1.1"]
        else:
            engine.inject_fault(1, 1, "kill")
            streams.until(lambda: engine.events.of("rejoined"), "instance 0 back home")
            assert engine.instances[0].workers == ["w0.0", "w0.1"]
        streams.finish()
        assert streams.tokens(seqs) == want
        streams.until(lambda: _all_home(engine), "the second replacement")


@pytest.mark.parametrize("kind", ["kill", "hang"])
def test_a_replacement_fails_as_it_loads(kind):
    """The replacement is hit as soon as it registers: loading the tiny
    model takes milliseconds, so it may have loaded already, and then
    instance 0 may be moving back to it. Either way it is replaced again."""
    prompts, params = _long_workload()
    want = _reference(prompts, params)
    with LLM(tiny_model(), num_instances=2, pp_size=2, **ARGS) as llm:
        engine, streams, seqs = _start(llm, prompts, params)
        engine.inject_fault(0, 0, "kill")
        record = engine.workers["w0.0"]
        streams.until(lambda: engine.events.of("detected") and record.state in (
            WorkerState.LOADING, WorkerState.READY), "the replacement to register")
        engine.inject_fault(0, 0, kind)
        streams.until(lambda: len(engine.events.of("detected")) == 2, "the second failure")
        assert engine.instances[0].workers == ["w1.0", "w0.1"]
        streams.finish()
        assert streams.tokens(seqs) == want
        streams.until(lambda: _all_home(engine), "a replacement that loads")
        assert len(engine.events.of("replacement_started")) == 2


def test_a_replacement_stopped_before_it_registers_is_replaced_at_the_loading_deadline(expected):
    """A SIGSTOP while the replacement still starts (it sends no heartbeat
    before it registers): replaced after the loading deadline, not after
    the 120 s registration deadline."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2, **ARGS) as llm:
        engine, streams, seqs = _start(llm, prompts, params)
        engine.inject_fault(0, 0, "kill")
        streams.until(lambda: engine.events.of("replacement_started"), "a replacement")
        record = engine.workers["w0.0"]
        assert record.state is WorkerState.STARTING
        os.kill(engine.launcher.procs[(0, 0)].pid, signal.SIGSTOP)
        streams.finish()
        assert streams.tokens(seqs) == expected
        streams.until(lambda: len(engine.events.of("replacement_started")) == 2,
                      "a second replacement", timeout_s=60)
        detected = engine.events.of("detected")[-1]
        assert detected.worker == "w0.0" and "stopped before it registered" in detected.detail
        streams.until(lambda: _all_home(engine), "the second replacement")


def test_two_instances_hit_at_once(expected):
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2, **ARGS) as llm:
        engine, streams, seqs = _start(llm, prompts, params)
        engine.inject_fault(0, 0, "kill")
        engine.inject_fault(1, 1, "hang")
        streams.until(lambda: len(engine.events.of("rerouted")) == 2, "both reroutes")
        routes = {e.instance: e.detail.split(";")[0] for e in engine.events.of("rerouted")}
        assert routes == {0: "w1.0 -> w0.1", 1: "w1.0 -> w0.1"}, routes
        streams.finish()
        assert streams.tokens(seqs) == expected
        streams.until(lambda: _all_home(engine), "both replacements")
        assert [o.token_ids for o in llm.generate(prompts[:3], params[:3])] == expected[:3]


def test_a_failure_in_one_pipeline_of_a_borrowed_worker_leaves_the_other_alone(expected):
    """w1.0 serves instance 0 (its w0.0 died) and instance 1. When w1.1 dies,
    w1.0's failed sends to it belong to instance 1's steps: instance 0 goes
    on without a pause, and only instance 1 is rerouted."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2, **ARGS) as llm:
        engine, streams, seqs = _start(llm, prompts, params)
        engine.inject_fault(0, 0, "kill")
        streams.until(lambda: _phase(engine, 0) is Phase.SERVING
                      and engine.instances[0].workers == ["w1.0", "w0.1"], "the reroute")
        streams.until(lambda: len(streams.outputs) > 0 and engine.status().instances[0].steps
                      > 0, "steps of both pipelines")
        before = len(engine.events.events)
        engine.inject_fault(1, 1, "kill")
        streams.until(lambda: len(engine.events.of("detected")) == 2, "the second failure")
        streams.finish()
        assert streams.tokens(seqs) == expected
        after = list(engine.events.events)[before:]
        assert not [e for e in after if e.instance == 0 and e.kind == "aborted"
                    and "communicator error" in e.detail], after
