"""The failover benchmark: its traces, its metric arithmetic, and a real
end-to-end run (tiny model, real kill) through the command line that checks
the JSON, the plots and the table."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kevlarflow.bench.failover import metrics as m
from kevlarflow.bench.failover.runner import Failure
from kevlarflow.bench.trace import MAX_FACTOR, MIN_TOKENS, sharegpt_file, sharegpt_like, summary
from kevlarflow.cli import main as kevlarflow_cli
from helpers.models import tiny_model


# Traces ----------------------------------------------------------------------------------

def test_sharegpt_like_is_seeded_poisson_and_long_tailed():
    trace = sharegpt_like(rate=20, duration_s=200, mean_prompt=64, mean_output=32,
                          vocab_size=1000, seed=3)
    assert trace == sharegpt_like(20, 200, 64, 32, 1000, seed=3)
    assert trace != sharegpt_like(20, 200, 64, 32, 1000, seed=4)
    # 4000 arrivals expected; Poisson sd is about 63.
    assert abs(len(trace) - 4000) < 300
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(trace, trace[1:])]
    assert abs(sum(gaps) / len(gaps) - 1 / 20) < 0.005
    assert all(0 < t.arrival_s <= 200 for t in trace)
    prompts = sorted(len(t.prompt) for t in trace)
    outputs = [t.output_len for t in trace]
    assert min(prompts) >= MIN_TOKENS and max(prompts) <= MAX_FACTOR * 64
    assert min(outputs) >= MIN_TOKENS and max(outputs) <= MAX_FACTOR * 32
    # Clipping trims the mean a little; the median sits well below it (long tail).
    s = summary(trace)
    assert 50 < s["mean_prompt_tokens"] < 70 and 25 < s["mean_output_tokens"] < 35
    assert prompts[len(prompts) // 2] < 0.75 * s["mean_prompt_tokens"]
    assert all(16 <= tok < 1000 for t in trace[:50] for tok in t.prompt)


@pytest.mark.parametrize("bad", [dict(rate=0), dict(duration_s=-1), dict(mean_prompt=2)])
def test_sharegpt_like_refuses_bad_arguments(bad):
    args = dict(rate=1, duration_s=10, mean_prompt=64, mean_output=32, vocab_size=1000) | bad
    with pytest.raises(ValueError):
        sharegpt_like(**args)


def test_sharegpt_file_reads_conversations(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model())
    convs = [{"id": str(i), "conversations": [
        {"from": "human", "value": "tell me about foxes " * (1 + i % 5)},
        {"from": "gpt", "value": "foxes are quick and brown " * (1 + i % 3)}]} for i in range(40)]
    convs.append({"id": "broken", "conversations": [{"from": "human"}]})  # skipped
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    trace = sharegpt_file(path, rate=2, duration_s=10, tokenizer=tokenizer, max_prompt=512,
                          max_output=512, seed=0)
    assert len(trace) > 5
    texts = {tuple(tokenizer.encode(c["conversations"][0]["value"])) for c in convs[:40]}
    assert all(tuple(r.prompt) in texts for r in trace)
    replies = {len(tokenizer.encode(c["conversations"][1]["value"])) for c in convs[:40]}
    assert all(r.output_len in replies for r in trace)
    with pytest.raises(ValueError, match="only"):
        sharegpt_file(path, rate=50, duration_s=10, tokenizer=tokenizer, max_prompt=512,
                      max_output=512)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        sharegpt_file(tmp_path / "bad.json", 1, 10, tokenizer, 512, 512)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no conversation"):
        sharegpt_file(tmp_path / "empty.json", 1, 10, tokenizer, 512, 512)


@pytest.mark.parametrize("text", ["", "10", "x:0:1", "10:0:1:melt", "-1:0:1", "1:2:3:kill:9"])
def test_failure_schedule_refuses_bad_entries(text):
    with pytest.raises(ValueError, match="AT:INSTANCE:STAGE|kind"):
        Failure.parse(text)


def test_failure_schedule_entries():
    assert Failure.parse("12.5:1:0:hang") == Failure(12.5, 1, 0, "hang")
    assert Failure.parse("3:0:1") == Failure(3.0, 0, 1, "kill")


# Metrics ---------------------------------------------------------------------------------

def _run(requests, events=(), elapsed=10.0):
    return dict(elapsed_s=elapsed, events=list(events), tokens_recomputed=7, tokens_restored=3,
                bytes_replicated=100,
                requests=[dict(arrival_s=a, output_tokens=n, token_times_s=list(times),
                               instance=0) for a, n, times in requests])


def test_metrics_of_a_run():
    run = _run([(0.0, 3, [1.0, 1.5, 2.0]),      # ttft 1, latency 2, tpot 0.5
                (1.0, 2, [1.5, 4.5]),           # ttft 0.5, latency 3.5, tpot 3
                (2.0, 3, [2.5])],               # failed: 1 of 3 tokens
               events=[dict(kind="failed", t_s=1.0, instance=0, worker="w0.1"),
                       dict(kind="detected", t_s=1.25, instance=0, worker="w0.1"),
                       dict(kind="resumed", t_s=1.5, instance=0),
                       dict(kind="first_step_after_failure", t_s=0.5, instance=0),  # before
                       dict(kind="first_step_after_failure", t_s=3.0, instance=1),  # other one
                       dict(kind="first_step_after_failure", t_s=2.0, instance=0)])
    got = m.run_metrics(run, dict(ttft_s=0.75, tpot_s=1.0))
    assert got["requests"] == 3 and got["requests_failed"] == 1
    assert got["avg_latency_s"] == pytest.approx(2.75) and got["p99_latency_s"] == 3.5
    assert got["avg_ttft_s"] == pytest.approx(0.75) and got["p99_ttft_s"] == 1.0
    assert got["mean_tpot_s"] == pytest.approx(1.75)
    assert got["detect_s"] == 0.25 and got["resumed_s"] == 0.5 and got["mttr_s"] == 1.0
    assert got["throughput_tok_s"] == pytest.approx(0.6)
    assert got["goodput_rps"] == 0.0  # one is too slow to start, the other per token
    assert m.run_metrics(run, dict(ttft_s=1.0, tpot_s=1.0))["goodput_rps"] == pytest.approx(0.1)
    # SLOs: 5x the baseline's medians; none when the baseline completed nothing.
    assert m.slos(run) == dict(ttft_s=pytest.approx(5 * 0.75), tpot_s=pytest.approx(5 * 1.75))
    no_slo = m.slos(_run([(0.0, 3, [1.0])]))
    assert no_slo == dict(ttft_s=None, tpot_s=None)
    assert m.run_metrics(run, no_slo)["goodput_rps"] == pytest.approx(0.2)
    fault_free = m.run_metrics(_run([(0.0, 1, [0.5])]), dict(ttft_s=1, tpot_s=1))
    assert fault_free["mttr_s"] is None and fault_free["mean_tpot_s"] is None


def test_mttr_of_two_failures_matches_each_with_its_own_instance():
    run = _run([(0.0, 1, [1.0])], events=[
        dict(kind="failed", t_s=1.0, instance=0, worker="w0.0"),
        dict(kind="detected", t_s=1.1, instance=0, worker="w0.0"),
        dict(kind="failed", t_s=5.0, instance=1, worker="w1.0"),
        dict(kind="first_step_after_failure", t_s=2.0, instance=0),
        dict(kind="detected", t_s=6.0, instance=1, worker="w1.0"),
        dict(kind="first_step_after_failure", t_s=8.0, instance=1)])
    got = m.recovery_times(run)
    assert got["mttr_s"] == pytest.approx((1.0 + 3.0) / 2)
    assert got["detect_s"] == pytest.approx((0.1 + 1.0) / 2)
    # An instance that never steps again has no MTTR (not a flattering zero).
    run["events"].pop()
    assert m.recovery_times(run)["mttr_s"] is None


def test_a_failure_without_an_injected_fault_counts_from_its_detection():
    """Real faults are not injected: the server's MTTR and the benchmark's
    then count from the detection, through the same function."""
    from kevlarflow.ft.events import failure_timings

    timings = failure_timings([("detected", 10.0, 0, "w0.1"), ("resumed", 10.2, 0, None),
                               ("first_step_after_failure", 10.5, 0, None)])
    assert timings == [dict(at=10.0, instance=0, detect_s=0.0, resumed_s=pytest.approx(0.2),
                            mttr_s=pytest.approx(0.5))]


def test_recovery_overhead_is_the_mttr_less_one_step_of_the_failed_instances_requests():
    # Instance 0 decodes a token every 0.2 s before the fault at 10 s, instance
    # 1 every 1 s; instance 0 steps again 0.25 s after the fault.
    run = _run([(8.0, 12, [8.2 + 0.2 * i for i in range(12)])], events=[
        dict(kind="failed", t_s=10.0, instance=0, worker="w0.1"),
        dict(kind="detected", t_s=10.03, instance=0, worker="w0.1"),
        dict(kind="first_step_after_failure", t_s=10.25, instance=0)])
    run["requests"].append(dict(arrival_s=5.0, output_tokens=5, instance=1,
                                token_times_s=[5.5, 6.5, 7.5, 8.5, 9.5]))
    assert m.step_floor(run, 0, 10.0) == pytest.approx(0.2)
    assert m.step_floor(run, 1, 10.0) == pytest.approx(1.0)
    got = m.recovery_times(run)
    assert got["mttr_s"] == pytest.approx(0.25)
    assert got["recovery_overhead_s"] == pytest.approx(0.05)
    # Only gaps wholly in the window before the fault count; none: no figure.
    assert m.step_floor(run, 0, 8.3) is None


def test_summaries_ratios_and_targets():
    def summary_of(**values):
        return {k: dict(median=v, min=v, max=v) for k, v in values.items()}

    base = dict(avg_latency_s=2.0, p99_latency_s=4.0, avg_ttft_s=1.0, p99_ttft_s=2.0,
                mean_tpot_s=0.1, requests_failed=0)
    metrics = {
        "kevlarflow": dict(failure=summary_of(mttr_s=0.5, recovery_overhead_s=0.04, **base),
                           fault_free=summary_of(**base | dict(avg_latency_s=2.01))),
        "restart": dict(failure=summary_of(mttr_s=20.0, recovery_overhead_s=19.5,
                                           **base | dict(p99_ttft_s=8.0)),
                        fault_free=summary_of(**base)),
    }
    ratios = m.paper_ratios(metrics)
    assert set(ratios) == {"kevlarflow"}
    assert ratios["kevlarflow"]["under_failure"]["mttr_s"] == 40.0
    assert ratios["kevlarflow"]["under_failure"]["p99_ttft_s"] == 4.0
    assert ratios["kevlarflow"]["fault_free_overhead"]["avg_latency_s"] == pytest.approx(0.005)
    targets = m.targets(metrics, ratios)
    assert set(targets) == {"mttr_vs_restart", "recovery_overhead", "p99_ttft_failure_vs_fault_free",
                            "p99_latency_failure_vs_fault_free", "fault_free_overhead",
                            "requests_failed"}
    assert all(t["met"] for t in targets.values()), targets
    # Paired rounds replace the medians' ratio by their interval's upper end.
    paired = {"kevlarflow": {"avg_latency_s": dict(ratios=[0.0, 0.02], mean=0.01, median=0.01,
                                                   ci95=[0.0, 0.02])}}
    assert m.targets(metrics, ratios, paired)["fault_free_overhead"] == dict(
        what=m.TARGETS[6][1], bound=0.01, value=0.02, met=False, higher_is_better=False)
    # A restart on a new node: the latency and TTFT ratios under failure.
    new_node = m.targets(metrics, ratios, new_node=True)
    assert set(new_node) == {"mttr_vs_restart", "p99_ttft_vs_restart", "avg_latency_vs_restart",
                             "fault_free_overhead", "requests_failed"}
    assert new_node["p99_ttft_vs_restart"]["met"] is False  # 4x, not 10x
    assert new_node["avg_latency_vs_restart"]["value"] == 1.0
    metrics["kevlarflow"]["failure"]["requests_failed"]["max"] = 1
    metrics["kevlarflow"]["failure"]["p99_latency_s"]["median"] = 6.1
    metrics["kevlarflow"]["failure"]["recovery_overhead_s"]["median"] = 0.06
    targets = m.targets(metrics, ratios)
    assert not targets["requests_failed"]["met"]
    assert not targets["p99_latency_failure_vs_fault_free"]["met"]
    assert not targets["recovery_overhead"]["met"]
    assert m.summarize([dict(a=1.0, b=None), dict(a=3.0, b=None), dict(a=2.0, b=None)]) == \
        dict(a=dict(median=2.0, min=1.0, max=3.0), b=None)


def test_paired_overhead_is_the_mean_ratio_with_a_bootstrap_interval():
    from kevlarflow.bench.failover.paired import bootstrap_mean_ci, paired_overhead

    def rounds(*latencies):
        return [dict(avg_latency_s=v, p99_latency_s=2 * v, mean_tpot_s=None, worker_cpu_s=1.0,
                     controller_cpu_s=None) for v in latencies]

    got = paired_overhead({"restart": rounds(1.0, 2.0, 1.0, 2.0),
                           "kevlarflow": rounds(1.01, 2.04, 1.0, 2.0)}, "restart")
    lat = got["kevlarflow"]["avg_latency_s"]
    assert lat["ratios"] == pytest.approx([0.01, 0.02, 0.0, 0.0])
    assert lat["mean"] == pytest.approx(0.0075) and lat["median"] == pytest.approx(0.005)
    assert lat["ci95"][0] <= lat["mean"] <= lat["ci95"][1]
    assert 0.0 <= lat["ci95"][0] and lat["ci95"][1] <= 0.02
    assert got["kevlarflow"]["mean_tpot_s"] is None  # nothing to compare
    assert got["kevlarflow"]["worker_cpu_s"]["ci95"] == [0.0, 0.0]
    # The interval narrows as pairs agree, and is seeded.
    wide = bootstrap_mean_ci([-0.1, 0.1, -0.1, 0.1])
    narrow = bootstrap_mean_ci([-0.01, 0.01, -0.01, 0.01])
    assert wide[1] - wide[0] > 5 * (narrow[1] - narrow[0])
    assert bootstrap_mean_ci([0.1, 0.3, 0.2]) == bootstrap_mean_ci([0.1, 0.3, 0.2])


# A real run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """Two modes, a real SIGKILL, both conditions and two replacement delays,
    through the command line: one run, read by the tests below."""
    out = tmp_path_factory.mktemp("bench") / "results"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "kevlarflow", "bench", "failover", "--model", tiny_model(),
         # Long outputs keep several requests of the failed instance decoding
         # for many replication intervals when the kill lands, whatever the
         # machine's speed: what they computed before the last transfer is
         # what KevlarFlow keeps.
         "--duration", "4", "--rate", "4", "--output-len", "256",
         "--fail", "2:0:1:kill", "--chunk", "32",
         "--kv-memory", str(1 << 20), "--modes", "kevlarflow,restart", "--out", str(out),
         # The tiny model decodes a token in milliseconds: transfers every 50 ms
         # keep the lag at a few tokens, as the default does on real models.
         "--replication-interval", "0.05", "--rounds", "2", "--replacement-delay", "0,2"],
        capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_benchmark_end_to_end(bench_run):
    """No request lost, MTTR only under failure, the table, the JSON and the
    plots (of the same-machine setting)."""
    proc, out = bench_run
    assert "restart / kevlarflow under failure: MTTR" in proc.stdout
    assert "targets (kevlarflow mode)" in proc.stdout
    doc = json.loads((out / "same-machine" / "failover.json").read_text())
    assert doc["schema"] == "kevlarflow.failover/1"
    assert doc["config"]["failures"] == [dict(at_s=2.0, instance=0, stage=1, kind="kill")]
    n = doc["config"]["trace"]["requests"]
    assert n == len(doc["trace"]) > 5
    for mode in ("kevlarflow", "restart"):
        failure, fault_free = doc["metrics"][mode]["failure"], doc["metrics"][mode]["fault_free"]
        assert failure["requests_failed"]["max"] == 0 == fault_free["requests_failed"]["max"]
        assert failure["mttr_s"]["median"] > 0 and fault_free["mttr_s"] is None
        assert failure["recovery_overhead_s"]["median"] < failure["mttr_s"]["median"]
        for key in ("avg_latency_s", "p99_latency_s", "avg_ttft_s", "p99_ttft_s",
                    "mean_tpot_s", "goodput_rps", "tokens_recomputed", "worker_cpu_s",
                    "controller_cpu_s"):
            assert failure[key] is not None and fault_free[key] is not None, key
        assert len(doc["runs"][mode]["fault_free"]) == 2  # the rounds
        run = doc["runs"][mode]["failure"][0]
        kinds = [e["kind"] for e in run["events"]]
        assert kinds[0] == "failed" and "first_step_after_failure" in kinds
        assert len(run["requests"]) == n
        assert all(len(r["token_times_s"]) == r["output_tokens"] for r in run["requests"])
        assert not any(e["kind"] == "failed" for e in doc["runs"][mode]["fault_free"][0]["events"])
    # The baseline recomputes every token its failed instance had computed;
    # KevlarFlow keeps most of that KV (it recomputes what its replicas
    # missed), and serves again sooner. (The two runs fail at different
    # moments of their requests: their counts are not compared.)
    kf, restart = doc["runs"]["kevlarflow"]["failure"][0], doc["runs"]["restart"]["failure"][0]
    assert restart["tokens_recomputed"] > 0 and restart["tokens_restored"] == 0
    assert kf["tokens_restored"] > kf["tokens_recomputed"]
    assert doc["config"]["replication_interval_s"] == 0.05
    metrics = doc["metrics"]
    assert metrics["restart"]["failure"]["mttr_s"]["median"] > \
        metrics["kevlarflow"]["failure"]["mttr_s"]["median"]
    ratio = doc["ratios"]["kevlarflow"]["under_failure"]["mttr_s"]
    assert math.isclose(ratio, doc["metrics"]["restart"]["failure"]["mttr_s"]["median"]
                        / doc["metrics"]["kevlarflow"]["failure"]["mttr_s"]["median"])
    assert doc["targets"]["requests_failed"]["met"] is True
    # The fault-free cost comes from the two rounds, pair by pair.
    pairs = doc["fault_free_pairs"]["kevlarflow"]["avg_latency_s"]
    assert len(pairs["ratios"]) == 2 and pairs["ci95"][0] <= pairs["mean"] <= pairs["ci95"][1]
    assert doc["ratios"]["kevlarflow"]["fault_free_overhead"]["avg_latency_s"] == pairs["mean"]
    assert "interleaved pairs" in proc.stdout
    # Where replication's share of the fault-free cost goes: only KevlarFlow replicates.
    kf_ff, restart_ff = metrics["kevlarflow"]["fault_free"], metrics["restart"]["fault_free"]
    assert kf_ff["replication_bytes_sent"]["min"] > 0 and kf_ff["replication_pack_s"]["min"] > 0
    assert restart_ff["replication_bytes_sent"]["max"] == 0
    assert "kevlarflow replication per fault-free round" in proc.stdout
    assert len(doc["timelines"]) == 5
    for name in doc["timelines"]:
        assert (out / "same-machine" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_replacement_delay_is_a_setting_of_its_own(bench_run):
    """--replacement-delay 0,2: a failure trace and runs per setting, in a
    folder each, sharing the fault-free rounds; every new process for the
    failed slot waits out the delay, in both modes."""
    proc, out = bench_run
    same, new = (json.loads((out / name / "failover.json").read_text())
                 for name in ("same-machine", "new-node-2s"))
    assert same["config"]["setting"] == "same-machine" and same["config"]["replacement_delay_s"] == 0
    assert new["config"]["setting"] == "new-node-2s" and new["config"]["replacement_delay_s"] == 2
    assert same["metrics"]["restart"]["fault_free"] == new["metrics"]["restart"]["fault_free"]
    assert same["runs"]["kevlarflow"]["fault_free"] == new["runs"]["kevlarflow"]["fault_free"]
    assert same["runs"]["kevlarflow"]["failure"] != new["runs"]["kevlarflow"]["failure"]
    for mode in ("kevlarflow", "restart"):
        events = new["runs"][mode]["failure"][0]["events"]
        detected = next(e["t_s"] for e in events if e["kind"] == "detected")
        started = [e["t_s"] for e in events if e["kind"] == "replacement_started"]
        assert started and min(started) - detected >= 2.0, (mode, events)
        assert new["metrics"][mode]["failure"]["requests_failed"]["max"] == 0
    # The delay holds restart's instance down; KevlarFlow serves through it.
    assert new["metrics"]["restart"]["failure"]["mttr_s"]["median"] > 2.0
    assert new["metrics"]["kevlarflow"]["failure"]["mttr_s"]["median"] < 2.0
    assert set(new["targets"]) >= {"p99_ttft_vs_restart", "avg_latency_vs_restart"}
    assert "recovery_overhead" in same["targets"] and "recovery_overhead" not in new["targets"]
    assert "new-node-2s:" in proc.stdout and "same-machine:" in proc.stdout
    assert len(new["timelines"]) == 5
    for name in new["timelines"]:
        assert (out / "new-node-2s" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failure_trace_runs_on_past_its_last_failure():
    """Without --duration, a failure trace lasts 2 replacement delays, and at
    least 10 s, past its last failure (never less than the fault-free one);
    --duration fixes every trace's length."""
    from kevlarflow.bench.failover.cli import failure_trace_s, parse, trace_length

    args = parse(["--model", tiny_model(), "--rate", "4", "--requests", "8"])
    base = trace_length(args, 4.0)
    assert base == 6.0  # 8 requests at 4/s, but at least 6 s
    failures = [Failure(1.0, 0, 1, "kill"), Failure(3.0, 1, 0, "hang")]
    assert failure_trace_s(args, base, failures[:1], 0.0) == 11.0
    assert failure_trace_s(args, base, failures[:1], 2.0) == 11.0
    assert failure_trace_s(args, base, failures[:1], 30.0) == 61.0
    assert failure_trace_s(args, base, failures, 6.0) == 15.0
    assert failure_trace_s(args, 20.0, failures[:1], 0.0) == 20.0
    fixed = parse(["--model", tiny_model(), "--rate", "4", "--duration", "4"])
    assert failure_trace_s(fixed, trace_length(fixed, 4.0), failures, 30.0) == 4.0


def test_benchmark_measures_capacity_and_loads_to_a_fraction_of_it(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "kevlarflow", "bench", "failover", "--model", tiny_model(),
         "--duration", "3", "--load", "0.5", "--capacity-requests", "6",
         "--capacity-seconds", "1", "--chunk", "32",
         "--kv-memory", str(1 << 20), "--modes", "kevlarflow", "--conditions", "fault_free",
         "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "failover.json").read_text())
    load = doc["config"]["load"]
    assert load["fraction"] == 0.5 and load["capacity_rps"] > 0
    assert doc["config"]["trace"]["rate"] == pytest.approx(0.5 * load["capacity_rps"])
    # Levels of requests in flight, up to one where requests queue (2 instances
    # run 2 x 64 at once: 256), then on while the rate grows; the best counts.
    levels = load["capacity"]["levels"]
    assert [level["in_flight"] for level in levels] == [32, 64, 128, 256]
    assert all(level["tokens_per_s"] > 0 for level in levels)
    best = max(levels, key=lambda level: level["tokens_per_s"])
    assert load["capacity"]["tokens_per_s"] == best["tokens_per_s"]
    assert doc["config"]["failures"] == [] and list(doc["runs"]["kevlarflow"]) == ["fault_free"]
    assert doc["metrics"]["kevlarflow"]["fault_free"]["requests_failed"]["max"] == 0
    assert doc["timelines"] == ["timeline-kevlarflow-fault-free-1.png"]


def test_demo_is_the_benchmark_and_takes_its_options(tmp_path):
    """`make demo` runs `kevlarflow demo --out DIR`: the failover benchmark's
    preset, to which any of its options may be added."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "kevlarflow", "demo", "--out", str(out), "--model", tiny_model(),
         "--duration", "2", "--rate", "3", "--chunk", "32", "--kv-memory", str(1 << 20),
         "--modes", "kevlarflow", "--conditions", "fault_free", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "failover.json").read_text())
    assert list(doc["runs"]) == ["kevlarflow"] and doc["config"]["trace"]["rate"] == 3
    assert not (tmp_path / "demo-results").exists()
    # The demo's own options stay unless overridden: instances on CPUs of their own.
    assert doc["config"]["instance_cpus"] is not None


def _refused(argv: list[str], capsys) -> str:
    """Runs `kevlarflow *argv` in this process; it must exit with status 2
    (a usage error). Returns what it printed on stderr."""
    with pytest.raises(SystemExit) as exited:
        kevlarflow_cli(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, (argv, err)
    return err


def test_benchmark_refuses_bad_options(tmp_path, monkeypatch, capsys):
    # In this process, through the command line's own parsing and dispatch:
    # each refusal comes before anything starts, and a process per option
    # would only add an import of torch each time.
    monkeypatch.chdir(tmp_path)
    for bad in (["--modes", "kevlarflow,nope"], ["--fail", "3:5:0"], ["--fail", "x"],
                ["--rate", "-1"], ["--repeats", "0"], ["--conditions", "sometimes"],
                ["--preset", "huge"], ["--duration", "0"], ["--sharegpt", "missing.json"],
                ["--replication-interval", "-1"], ["--replacement-delay", "-2"],
                ["--replacement-delay", "0,0"], ["--replacement-delay", "x"], ["--rounds", "0"],
                ["--requests", "0"], ["--capacity-seconds", "0"],
                ["--capacity-seconds", "nan"]):
        err = _refused(["bench", "failover", "--model", tiny_model(), *bad], capsys)
        assert "error:" in err, bad
    err = _refused(["bench", "failover", "--model", str(tmp_path)], capsys)
    assert "config.json" in err
    if torch.version.cuda is None:  # GPUs asked for where there are none
        for bench in ("failover", "throughput"):
            err = _refused(["bench", bench, "--model", tiny_model(), "--device", "cuda"], capsys)
            assert "needs a CUDA build of torch" in err, (bench, err)
    # And once as a process: the status a script sees.
    proc = subprocess.run([sys.executable, "-m", "kevlarflow", "bench", "failover",
                           "--model", tiny_model(), "--rate", "-1"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "error: --rate" in proc.stderr, proc.stderr
