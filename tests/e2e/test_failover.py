"""Failures of real worker processes (SIGKILL, SIGSTOP) under a load of
requests: every request completes with the tokens of a failure-free run,
through rerouting (KevlarFlow) or through restarting the instance (the
baseline), and the hard cases end in clear errors, never hangs."""
import random
import time

import psutil
import pytest

from kevlarflow import LLM
from kevlarflow.deploy.router import NoInstanceServing
from helpers.failover import ARGS, Streams, all_home, serve_with_fault, timeline, workload
from helpers.models import tiny_model

@pytest.fixture(scope="module")
def expected():
    prompts, params = workload()
    with LLM(tiny_model(), **{k: v for k, v in ARGS.items() if k != "hang_timeout_s"}) as llm:
        return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("kind", ["kill", "hang"])
def test_reroute_keeps_every_request(expected, stage, kind):
    outs, again, events, _ = serve_with_fault(stage, kind)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    assert [o.token_ids for o in again] == expected[:4]
    kinds = [e.kind for e in events]
    for k in ("failed", "detected", "aborted", "replacement_started", "rerouted", "resumed",
              "first_step_after_failure"):
        assert k in kinds, (k, kinds)
    assert kinds.index("failed") < kinds.index("detected") < kinds.index("rerouted") \
        < kinds.index("resumed") < kinds.index("first_step_after_failure")
    detected = next(e for e in events if e.kind == "detected")
    assert detected.worker == f"w0.{stage}"
    assert ("heartbeat" in detected.detail) == (kind == "hang")
    # The instance borrowed instance 1's worker of the failed stage.
    rerouted = next(e for e in events if e.kind == "rerouted")
    assert f"w1.{stage}" in rerouted.detail.split("; ")[0].split(" -> ")


def test_restart_baseline_recovers_too(expected):
    outs, again, events, stats = serve_with_fault(1, "kill", recovery="restart")
    recomputed = stats["tokens_recomputed"]
    assert recomputed > 0  # the instance's requests all started again
    assert [o.token_ids for o in outs] == expected
    assert [o.token_ids for o in again] == expected[:4]
    kinds = [e.kind for e in events]
    assert "rerouted" not in kinds
    # The whole instance was replaced: a replacement for each of its workers.
    assert sorted(e.worker for e in events if e.kind == "replacement_started") == ["w0.0", "w0.1"]


def test_requests_wait_out_a_stage_with_no_live_worker(expected):
    """Both workers of stage 0 die: no pipeline can be formed until a
    replacement joins. The requests in flight wait for it and recompute, new
    ones are taken and wait too, and every one ends with the failure-free
    tokens, its stream unbroken."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=1, **ARGS) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = streams.add(prompts[:6], params[:6])
        streams.until(lambda: any(len(s.output_token_ids) >= 2 for s in seqs), "tokens")
        engine.inject_fault(0, 0, "kill")
        engine.inject_fault(1, 0, "kill")
        streams.until(lambda: len(engine.events.of("detected")) == 2, "both deaths")
        assert not any(inst.serving for inst in engine.instances)
        assert engine.events.of("requests_held"), timeline(engine)
        late = streams.add(prompts[6:], params[6:])  # taken, not refused
        streams.finish()
        assert streams.tokens(seqs + late) == expected, timeline(engine)
        assert not engine.events.of("requests_failed"), timeline(engine)


def test_an_outage_past_its_timeout_fails_requests_with_an_error():
    """The same outage, with replacements that take longer (a cluster
    provisioning nodes) than the deployment waits: the requests end with
    finish_reason "error" once the outage timeout passed, new ones are then
    refused with a clear exception, and service resumes once replacements
    join."""
    prompts, params = workload(6)
    with LLM(tiny_model(), num_instances=2, pp_size=1, outage_timeout_s=0.5,
             replacement_delay_s=4.0, **ARGS) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = streams.add(prompts, params)
        streams.step()
        engine.inject_fault(0, 0, "kill")
        engine.inject_fault(1, 0, "kill")
        streams.until(lambda: all(streams.outputs.get(s.request_id) is not None and
                                  streams.output(s).finished for s in seqs), "the timeout")
        assert {streams.output(s).finish_reason for s in seqs} == {"error"}
        # The requests ended at the timeout, long before a new process could
        # have loaded (the replacements wait 4 s to start).
        held, failed = engine.events.of("requests_held"), engine.events.of("requests_failed")
        assert held and failed and "for 0.5 s" in failed[0].detail, timeline(engine)
        assert 0.5 <= failed[0].time - held[0].time < 2.0, timeline(engine)
        assert not any(inst.serving for inst in engine.instances)
        with pytest.raises(NoInstanceServing, match="no pipeline instance"):
            engine.add_request(prompts[0], params[0])
        streams.until(lambda: all(inst.serving for inst in engine.instances), "replacements")
        out = llm.generate(prompts[:2], params[:2])
        assert all(o.finish_reason == "length" for o in out)


def test_borrowed_worker_fails_too(expected):
    """(0, 1) dies, instance 0 borrows w1.1, then w1.1 dies as well, before
    (0, 1)'s replacement has joined: no stage-1 worker is left for a while.
    Every request waits it out and ends with the failure-free tokens."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2, **ARGS) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = streams.add(prompts, params)
        streams.until(lambda: any(len(s.output_token_ids) >= 2 for s in seqs), "tokens")
        engine.inject_fault(0, 1, "kill")
        streams.until(lambda: engine.events.of("rerouted"), "the reroute")
        engine.inject_fault(1, 1, "hang")
        streams.finish()
        assert streams.tokens(seqs) == expected, timeline(engine)
        assert all(streams.output(s).finish_reason == "length" for s in seqs)
        streams.until(lambda: all_home(engine), "both replacements")
        assert [o.token_ids for o in llm.generate(prompts[:3], params[:3])] == expected[:3]


def _connections_between(a: int, b: int) -> int:
    """TCP connections from process a to process b, established."""
    ports = {c.laddr.port for c in psutil.Process(b).net_connections("tcp")}
    return sum(1 for c in psutil.Process(a).net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports)


def test_a_pipeline_given_back_leaves_no_connection_open():
    """Instance 0 borrows w1.1, a middle stage (it sends hidden states on),
    its requests all finish there, then it moves back to its replacement
    with nothing left to run. Sends on the given-up generation must not keep
    its connections open (each held its Gloo context) on the worker given
    back, which is told only to abort, nor on w0.0, which builds anew:
    nothing links w0.0 and w1.1 once every slot is home."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=3, replacement_delay_s=3.0, **ARGS) as llm:
        engine = llm.engine
        streams = Streams(engine)
        engine.inject_fault(0, 1, "kill")
        streams.until(lambda: engine.events.of("resumed"), "the reroute")
        assert engine.instances[0].workers == ["w0.0", "w1.1", "w0.2"], timeline(engine)
        seqs = streams.add(prompts[:4], params[:4])
        streams.until(lambda: all(s.is_finished for s in seqs), "the requests, on w1.1")
        assert not engine.events.of("replacement_loaded"), "the requests outlasted the borrowing"
        streams.until(lambda: all_home(engine), "the move back")
        procs = engine.launcher.procs
        w00, w11 = procs[(0, 0)].pid, procs[(1, 1)].pid
        deadline = time.monotonic() + 10  # retired groups are torn down in the background
        while (linked := _connections_between(w00, w11) + _connections_between(w11, w00)):
            assert time.monotonic() < deadline, f"{linked} connections left\n{timeline(engine)}"
            streams.step()
            time.sleep(0.1)


def test_five_failures_in_a_row_under_load(expected):
    """Kills and hangs of every position, one after another, each while
    requests are running and the previous recovery may still be under way."""
    prompts, params = workload()
    rng = random.Random(1)
    with LLM(tiny_model(), num_instances=2, pp_size=2, **ARGS) as llm:
        engine = llm.engine
        streams = Streams(engine)
        faults = [(0, 0, "kill"), (1, 1, "hang"), (0, 1, "kill"), (1, 0, "kill"), (0, 0, "hang")]
        for round_, (instance, stage, kind) in enumerate(faults):
            seqs = streams.add(prompts, params)
            streams.until(lambda: any(len(s.output_token_ids) >= rng.randrange(1, 6)
                                      for s in seqs), "tokens")
            engine.inject_fault(instance, stage, kind)
            streams.finish()
            assert streams.tokens(seqs) == expected, round_
            streams.until(lambda: all_home(engine), "the rejoin")
        assert len(engine.events.of("detected")) == 5


def test_replacements_that_die_while_loading_are_replaced_again_after_a_backoff():
    """Three replacements of (0, 0) are killed before they can load: each is
    followed by another, after a wait that doubles (backoff_s), while the
    borrowed worker serves; the fourth joins."""
    from kevlarflow.ft.replacements import backoff_s

    prompts, params = workload(4)
    with LLM(tiny_model(), num_instances=2, pp_size=1, **ARGS) as llm:
        engine = llm.engine
        streams = Streams(engine)
        started = lambda: engine.events.of("replacement_started")  # noqa: E731
        engine.inject_fault(0, 0, "kill")
        died = []
        for attempt in (1, 2, 3):
            streams.until(lambda: len(started()) == attempt, f"replacement {attempt}")
            if attempt > 1:  # it waited for its backoff after the previous one died
                assert started()[-1].time - died[-1] >= backoff_s(attempt) - 0.05
            proc = engine.launcher.procs[(0, 0)]
            proc.kill()  # before it can register and load
            proc.wait()
            died.append(time.time())
            # Served meanwhile by the borrowed worker.
            seqs = streams.add(prompts, params)
            streams.until(lambda: all(s.is_finished for s in seqs), "requests")
            assert all(streams.output(s).finish_reason == "length" for s in seqs)
        streams.until(lambda: all_home(engine), "the rejoin")
        assert [e.detail for e in started()] == [f"attempt {k}" for k in (1, 2, 3, 4)]
        assert {e.worker for e in started()} == {"w0.0"}


def test_a_caller_that_pauses_is_no_failure():
    """Heartbeats queue up while the caller does not step; a pause longer than
    the hang timeout must not make healthy workers look hung."""
    prompts, params = workload(2)
    with LLM(tiny_model(), num_instances=1, pp_size=2, **ARGS) as llm:
        llm.generate(prompts, params)
        time.sleep(2.5 * ARGS["hang_timeout_s"])
        outs = llm.generate(prompts, params)
        assert all(o.finish_reason == "length" for o in outs)
        assert not llm.engine.events.of("detected")


def test_an_idle_async_engine_still_notices_a_hang():
    from kevlarflow import AsyncEngine
    from kevlarflow.deploy.controller import DeploymentConfig

    engine = AsyncEngine(tiny_model(), DeploymentConfig(num_instances=2, pp_size=1, **ARGS))
    try:
        deployment = engine.engine
        deployment.inject_fault(1, 0, "hang")  # no request anywhere: only polling can see it
        deadline = time.monotonic() + 30
        while not deployment.events.of("rejoined"):
            assert time.monotonic() < deadline, "the hang was never noticed"
            time.sleep(0.05)
        detected = deployment.events.of("detected")[0]
        assert detected.worker == "w1.0" and "heartbeat" in detected.detail
    finally:
        engine.shutdown()
