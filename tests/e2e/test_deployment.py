"""Deployments of real worker processes on loopback: pipeline outputs equal
the single-process engine's, instances share the load, nothing is orphaned."""

import os
import time

import psutil
import pytest

from kevlarflow import LLM, SamplingParams
from helpers import models
from helpers.failover import all_home
from helpers.models import tiny_model
from helpers.net import free_port

PROMPTS = models.PROMPTS + [
    "one more prompt that is long enough to be split into several prefill chunks " * 3]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
# Small chunks and pools: prefills span several micro-batches, decode batches mix.
ENGINE_ARGS = dict(max_num_batched_tokens=32, block_size=4, kv_cache_memory=1 << 20)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def expected():
    with LLM(tiny_model(), **ENGINE_ARGS) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("num_instances,pp_size", [(2, 1), (1, 2), (1, 4), (2, 2)])
def test_greedy_outputs_match_one_process(expected, num_instances, pp_size):
    before = _children()
    with LLM(tiny_model(), num_instances=num_instances, pp_size=pp_size, **ENGINE_ARGS) as llm:
        workers = _children() - before
        assert len(workers) == num_instances * pp_size
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert all(o.finish_reason == "length" for o in outs)
        if pp_size > 1:  # stages overlapped: several micro-batches were in flight
            assert max(inst.peak_in_flight for inst in llm.engine.status().instances) > 1
        if num_instances > 1:
            # Concurrent requests spread over both instances.
            served = {inst.steps > 0 for inst in llm.engine.status().instances}
            assert served == {True}
    # Every worker is reaped when the deployment shuts down.
    assert not (workers & _children())
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in workers)


def test_external_workers_register_with_a_controller(expected):
    """What a second host does: `kevlarflow worker --controller HOST:PORT`,
    started before or after the controller, takes any free slot."""
    import subprocess
    import sys

    port = free_port()
    token = "this-deployments-join-token"
    cmd = [sys.executable, "-m", "kevlarflow", "worker", "--controller", f"127.0.0.1:{port}"]
    env = dict(os.environ, KEVLARFLOW_JOIN_TOKEN=token)
    workers = [subprocess.Popen(cmd, env=env) for _ in range(2)]
    try:
        with LLM(tiny_model(), num_instances=1, pp_size=2, spawn_workers=False, port=port,
                 join_token=token, start_timeout_s=120, **ENGINE_ARGS) as llm:
            assert [w.name for w in llm.engine.status().workers if w.live] == ["w0.0", "w0.1"]
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
        # Told to shut down with the deployment, they exit on their own.
        assert [w.wait(timeout=30) for w in workers] == [0, 0]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()


def test_each_instance_runs_on_the_cpus_it_was_given(expected):
    """instance_cpus pins each instance's workers to its own CPUs; a
    replacement takes the same ones; the outputs do not change."""
    cpus = sorted(os.sched_getaffinity(0))
    sets = ((cpus[0],), (cpus[-1],))
    with LLM(tiny_model(), num_instances=2, pp_size=2, instance_cpus=sets,
             **ENGINE_ARGS) as llm:
        def affinity():
            return {slot: os.sched_getaffinity(proc.pid)
                    for slot, proc in llm.engine.launcher.procs.items()}

        assert affinity() == {(i, s): set(sets[i]) for i in range(2) for s in range(2)}
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
        old = llm.engine.launcher.procs[(0, 1)].pid
        llm.engine.inject_fault(0, 1, "kill")
        deadline = time.monotonic() + 60
        while not (all_home(llm.engine) and llm.engine.launcher.procs[(0, 1)].pid != old) \
                and time.monotonic() < deadline:
            llm.engine.step(timeout_s=0.05)
        assert all_home(llm.engine) and llm.engine.launcher.procs[(0, 1)].pid != old
        assert affinity()[(0, 1)] == set(sets[0])
    for bad in ((), ((),), ((10_000,),), (("0",),)):
        with pytest.raises(ValueError, match="instance_cpus"):
            LLM(tiny_model(), num_instances=2, pp_size=1, instance_cpus=bad)


def test_logprobs_and_streaming_through_a_pipeline():
    import asyncio

    from kevlarflow import AsyncEngine
    from kevlarflow.deploy.controller import DeploymentConfig

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    with LLM(tiny_model(), **ENGINE_ARGS) as llm:
        local = llm.generate(["streaming"], params)[0]
    engine = AsyncEngine(tiny_model(), DeploymentConfig(pp_size=2, **ENGINE_ARGS))
    try:
        async def stream():
            return [out async for out in engine.generate("streaming", params)]
        deltas = asyncio.run(stream())
    finally:
        engine.shutdown()
    assert [t for d in deltas for t in d.new_token_ids] == local.token_ids
    remote = deltas[-1].logprobs
    assert [lp.token_id for lp in remote] == [lp.token_id for lp in local.logprobs]
    for a, b in zip(remote, local.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [i for i, _ in a.top] == [i for i, _ in b.top]


def test_a_stream_closed_early_aborts_its_request_and_the_engine_goes_on():
    """A client that goes away mid-stream aborts its request (the server
    does this on a disconnect); the deployment frees its KV and serves on."""
    import asyncio

    from kevlarflow import AsyncEngine
    from kevlarflow.deploy.controller import DeploymentConfig

    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine = AsyncEngine(tiny_model(), DeploymentConfig(num_instances=2, pp_size=2,
                                                        **ENGINE_ARGS))
    try:
        async def leave_early():
            stream = engine.generate("goodbye", params)
            async for out in stream:
                if len(out.token_ids) >= 3:
                    break
            await stream.aclose()

        async def complete():
            return [out async for out in engine.generate("still served", params)][-1]

        asyncio.run(leave_early())
        last = asyncio.run(complete())
        assert engine.alive and last.finish_reason == "length" and len(last.token_ids) == 40
        deployment = engine.engine
        deadline = time.monotonic() + 10
        while deployment.has_unfinished() or any(w.blocks_used for w in deployment.status().workers):
            assert time.monotonic() < deadline, "the aborted request kept its KV"
            time.sleep(0.05)
    finally:
        engine.shutdown()


def test_a_worker_that_cannot_start_fails_the_deployment_at_once(tmp_path):
    """A checkpoint the workers cannot load (the controller can read its
    config): a clear error within seconds, not a wait for the start timeout."""
    import shutil
    import time

    from kevlarflow.deploy.controller import DeploymentError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model(), broken)
    for weights in broken.glob("*.safetensors"):
        data = weights.read_bytes()
        header = int.from_bytes(data[:8], "little")
        weights.write_bytes(data[:8 + header + 16])  # the header, and hardly any tensor
    start = time.monotonic()
    before = _children()
    with pytest.raises(DeploymentError, match="exited with code"):
        LLM(str(broken), num_instances=1, pp_size=2, start_timeout_s=300)
    assert time.monotonic() - start < 60
    assert not (_children() - before)
    # Not even a header: the controller says so before it starts anything.
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="safetensors header"):
        LLM(str(broken), num_instances=1, pp_size=2, start_timeout_s=300)
    assert not (_children() - before)
