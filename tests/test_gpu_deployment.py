"""Deployments on CUDA: workers load their stages on GPUs, pipelines link
over NCCL between distinct GPUs and over Gloo through pinned host memory on
a shared one, and a real SIGKILL or SIGSTOP under load still completes every
request with the tokens of a failure-free run. Marked gpu: skipped without
CUDA."""
import re

import pytest
import torch

from kevlarflow import LLM
from helpers.failover import ARGS, Streams, recomputed, serve_with_fault, workload
from helpers.models import tiny_model

pytestmark = pytest.mark.gpu

GPU_ARGS = dict(ARGS, device="cuda", dtype="float32")


@pytest.fixture(scope="module")
def expected():
    """The failure-free run of the same deployment on the GPU."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2, **GPU_ARGS) as llm:
        return [o.token_ids for o in llm.generate(prompts, params)]


def test_every_worker_loads_on_a_gpu(expected, caplog):
    caplog.set_level("INFO", logger="kevlarflow.controller")
    with LLM(tiny_model(), num_instances=2, pp_size=2, **GPU_ARGS) as llm:
        devices = {r.name: r.device for r in llm.engine.workers}
        prompts, params = workload(4)
        outs = llm.generate(prompts, params)
    visible = torch.cuda.device_count()
    assert devices == {f"w{i}.{s}": f"cuda:{(2 * i + s) % visible}"
                       for i in range(2) for s in range(2)}
    assert [o.token_ids for o in outs] == expected[:4]
    if visible == 1:  # four workers on one GPU: every pipeline over Gloo, staged on the host
        builds = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pipe")]
        assert builds and all("over gloo (members share a GPU)" in b for b in builds), builds


def test_cuda_deployment_matches_the_cpu_one(expected):
    """fp32 on both: the GPU deployment samples the CPU deployment's tokens."""
    prompts, params = workload()
    cpu_args = {k: v for k, v in GPU_ARGS.items() if k != "device"}
    with LLM(tiny_model(), num_instances=2, pp_size=2, **cpu_args) as llm:
        cpu = [o.token_ids for o in llm.generate(prompts, params)]
    assert cpu == expected


def test_decode_graphs_give_the_eager_deployment_s_tokens(capfd, monkeypatch):
    """Workers replaying their decode steps from CUDA graphs (the default)
    sample the tokens of the same deployment run eagerly. The workers' logs
    (their stderr is the test's) say that every one of them replayed graphs,
    and that the eager ones captured none."""
    monkeypatch.setenv("KEVLARFLOW_LOG_LEVEL", "INFO")
    prompts, params = workload()
    runs = {}
    for eager in (False, True):
        capfd.readouterr()
        with LLM(tiny_model(), num_instances=2, pp_size=2, enforce_eager=eager,
                 **GPU_ARGS) as llm:
            tokens = [o.token_ids for o in llm.generate(prompts, params)]
        runs[eager] = tokens, capfd.readouterr().err
    (graphs, graph_log), (eager, eager_log) = runs[False], runs[True]
    assert graphs == eager
    replayed = dict(re.findall(r"(w\d\.\d): (\d+) decode steps replayed CUDA graphs", graph_log))
    assert sorted(replayed) == ["w0.0", "w0.1", "w1.0", "w1.1"], graph_log[-3000:]
    assert all(int(count) > 0 for count in replayed.values()), replayed
    assert "CUDA graphs" not in eager_log


# Recovery's logic does not depend on the device (the CPU tests run every
# combination); on a GPU these three cover a crash and a hang, and the restart.
@pytest.mark.parametrize("kind,recovery", [("kill", "kevlarflow"), ("hang", "kevlarflow"),
                                           ("kill", "restart")])
def test_a_failure_under_load_loses_no_request(expected, kind, recovery):
    outs, again, _, stats = serve_with_fault(1, kind, recovery, **GPU_ARGS)
    assert [o.token_ids for o in outs] == expected
    assert [o.token_ids for o in again] == expected[:4]
    if recovery == "kevlarflow":
        # The replicas on the backup GPU's pool became the rerouted requests' KV.
        assert stats["tokens_restored"] > 0
    else:
        assert stats["tokens_restored"] == 0 and stats["tokens_recomputed"] > 0


def test_replicas_on_the_backup_gpu_keep_all_but_the_last_step(expected):
    """A transfer after every step: after the kill, no request runs more
    than a block of tokens again (the CPU deployment's promise, in
    tests/e2e/test_replication.py), counted from the tokens the workers ran."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2,
             **dict(GPU_ARGS, replication_interval_s=0)) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = streams.add(prompts, params)
        victims = [s for s in seqs if engine.owner[s].index == 0]
        streams.until(lambda: all(len(s.output_token_ids) >= 4 or s.is_finished for s in seqs)
                      and all(link.ready for link in engine.replication.links.values()), "tokens")
        engine.inject_fault(0, 1, "kill")
        streams.finish()
        restored = engine.status().stats["tokens_restored"]
    assert [streams.output(s).token_ids for s in seqs] == expected
    assert restored > 0
    assert all(recomputed(s) <= ARGS["block_size"] for s in victims), \
        [recomputed(s) for s in victims]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL links need two GPUs")
def test_pipelines_on_distinct_gpus_link_over_nccl(expected, caplog):
    """One instance per GPU pair when there are two: each pipeline's stages
    sit on distinct GPUs, so the controller builds them over NCCL."""
    prompts, params = workload()
    caplog.set_level("INFO", logger="kevlarflow.controller")
    with LLM(tiny_model(), num_instances=2, pp_size=2, devices=("cuda:0", "cuda:1") * 2,
             **GPU_ARGS) as llm:
        outs = llm.generate(prompts, params)
        assert {w.device for w in llm.engine.workers} == {"cuda:0", "cuda:1"}
    assert [o.token_ids for o in outs] == expected
    builds = [r.getMessage() for r in caplog.records if " over " in r.getMessage()]
    assert builds and all("over nccl" in b for b in builds if b.startswith("pipe")), builds
