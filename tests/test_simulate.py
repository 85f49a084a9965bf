"""The failover simulator: its model behaves as the system it models, its
inputs are checked, and its command line runs end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kevlarflow.bench import simulate as simulate_cli
from kevlarflow.bench.sim.costs import FIELDS, PRESETS, Costs, from_dict, load_file
from kevlarflow.bench.sim.metrics import percentile, summarize
from kevlarflow.bench.sim.model import MODES, Failure, TraceRequest, simulate
from kevlarflow.bench.sim.validate import compare, prediction_errors, read_run
from kevlarflow.bench.sim.workload import capacity_requests_per_s, sharegpt_like

FIXTURE = Path(__file__).parent / "data" / "failover_small.json"
# A `make demo` run (medium, 2 x 2, every mode) and the costs `--calibrate`
# measured just before it on the same machine: the validation in
# docs/simulator.md.
DEMO_RUN = Path(__file__).parent / "data" / "demo_run_medium_2x2.json"
DEMO_COSTS = Path(__file__).parent / "data" / "demo_costs_medium.json"

# A small GPU-like deployment with round numbers, so that expected times can
# be worked out by hand: steps of 10 ms + 0.1 ms per token, fast links.
COSTS = Costs(instances=2, stages=2, max_num_batched_tokens=256, max_num_seqs=64,
              process_start_s=5.0, worker_init_s=1.0, weight_bytes_per_stage=4e9,
              weight_load_bytes_per_s=1e9, comm_build_s=0.5, detect_kill_s=0.1,
              detect_hang_s=1.0, link_bytes_per_s=10e9, activation_bytes_per_token=8192,
              kv_bytes_per_token_per_stage=65536, replication_interval_s=0.5,
              step_base_s=0.01, step_prefill_token_s=1e-4, step_decode_token_s=1e-4)
PROMPT, OUTPUT = 64, 64


def trace_at(load: float, duration: float = 60.0, costs: Costs = COSTS, seed: int = 0):
    rate = load * capacity_requests_per_s(costs, PROMPT, OUTPUT, seed)
    return sharegpt_like(rate, duration, PROMPT, OUTPUT, seed=seed)


def figures(costs, trace, mode, failures=()):
    sim = simulate(costs, trace, mode, failures)
    return summarize(sim.requests(), sim.mttr_s[0] if sim.mttr_s else None, sim.tokens_recomputed)


KILL = [Failure(20.0, 0, 1, "kill")]


# The model ------------------------------------------------------------------------------

def test_without_failures_every_mode_serves_identically():
    trace = trace_at(0.7)
    results = [simulate(COSTS, trace, mode).requests() for mode in MODES]
    assert results[0] == results[1] == results[2]
    assert all(r["last_s"] is not None for r in results[0])


def test_one_request_alone_takes_the_hand_computed_time():
    # Prompt 100 in one chunk: one round of 2 stage steps of 10 + 10 ms; then
    # each of the 4 remaining tokens is a round of 2 x (10 + 0.1) ms.
    sim = simulate(COSTS, [TraceRequest(1.0, 100, 5)], "kevlarflow")
    (r,) = sim.requests()
    assert r["first_s"] - 1.0 == pytest.approx(2 * 0.020)
    assert r["last_s"] - r["first_s"] == pytest.approx(4 * 2 * 0.0101)


def test_workers_sharing_cores_slow_each_other_down():
    # Two requests at once, one per instance: with one core for both, each
    # round takes twice as long as with a device per worker (hand-computed
    # above: 2 x 10.1 ms a decode round).
    trace = [TraceRequest(1.0, 100, 5), TraceRequest(1.0, 100, 5)]
    alone = simulate(COSTS, trace, "kevlarflow").requests()
    shared = simulate(COSTS.with_overrides(cpu_cores=1), trace, "kevlarflow").requests()
    for a, s in zip(alone, shared):
        assert s["last_s"] - s["first_s"] == pytest.approx(2 * (a["last_s"] - a["first_s"]))
    # One request alone on one core keeps one worker busy at a time: no slowdown.
    one = [TraceRequest(1.0, 100, 5)]
    assert simulate(COSTS.with_overrides(cpu_cores=1), one, "kevlarflow").requests() == \
        simulate(COSTS, one, "kevlarflow").requests()


def test_every_request_finishes_with_a_failure_in_every_mode():
    trace = trace_at(0.7)
    for mode in MODES:
        f = figures(COSTS, trace, mode, KILL)
        assert f["requests_failed"] == 0 and f["mttr_s"] is not None, mode


def test_restart_mttr_grows_with_weight_load_time_and_kevlarflows_does_not():
    trace = trace_at(0.5)
    mttr = {}
    for bandwidth in (4e9, 0.5e9):  # 1 s and 8 s to load a stage
        costs = COSTS.with_overrides(weight_load_bytes_per_s=bandwidth)
        mttr[bandwidth] = {mode: figures(costs, trace, mode, KILL)["mttr_s"]
                           for mode in ("kevlarflow", "restart")}
    assert mttr[0.5e9]["restart"] - mttr[4e9]["restart"] == pytest.approx(7.0, abs=0.2)
    assert mttr[0.5e9]["kevlarflow"] == pytest.approx(mttr[4e9]["kevlarflow"], abs=0.05)
    # kevlarflow: detection, a communicator, a round or so of recompute.
    assert mttr[4e9]["kevlarflow"] < COSTS.detect_kill_s + COSTS.comm_build_s + 0.5


def test_a_replacement_delay_holds_back_every_new_process_in_both_modes():
    trace = trace_at(0.5)
    events = {}
    for delay in (0.0, 30.0):
        costs = COSTS.with_overrides(replacement_delay_s=delay)
        for mode in ("kevlarflow", "restart"):
            log = simulate(costs, trace, mode, KILL).log
            events[delay, mode] = {e["kind"]: e["t_s"] for e in log}
    for mode in ("kevlarflow", "restart"):
        assert events[30.0, mode]["replacement_loaded"] - events[0.0, mode]["replacement_loaded"] \
            == pytest.approx(30.0)
    # KevlarFlow serves through a lent worker meanwhile: its MTTR does not move.
    assert events[30.0, "kevlarflow"]["first_step_after_failure"] == \
        pytest.approx(events[0.0, "kevlarflow"]["first_step_after_failure"])
    assert events[30.0, "restart"]["first_step_after_failure"] - \
        events[0.0, "restart"]["first_step_after_failure"] == pytest.approx(30.0, abs=0.1)


def test_pinned_instances_keep_their_own_cores_when_another_is_down():
    # One core per instance: the survivor of a restart does not speed up on
    # the dead instance's core, as it does where all workers share all cores.
    trace = trace_at(0.3, duration=40.0)
    slow_load = COSTS.with_overrides(weight_load_bytes_per_s=0.2e9, cpu_cores=2)
    shared = figures(slow_load, trace, "restart", KILL)
    pinned = figures(slow_load.with_overrides(pinned_instances=1), trace, "restart", KILL)
    assert pinned["avg_latency_s"] > 1.1 * shared["avg_latency_s"]
    # Without a failure, one core per instance or two shared by both are alike.
    assert figures(slow_load, trace, "restart")["avg_latency_s"] == pytest.approx(
        figures(slow_load.with_overrides(pinned_instances=1), trace, "restart")["avg_latency_s"],
        rel=0.05)


def test_a_hang_is_detected_later_than_a_kill():
    trace = trace_at(0.5)
    kill = figures(COSTS, trace, "kevlarflow", KILL)["mttr_s"]
    hang = figures(COSTS, trace, "kevlarflow", [Failure(20.0, 0, 1, "hang")])["mttr_s"]
    assert hang - kill == pytest.approx(COSTS.detect_hang_s - COSTS.detect_kill_s, abs=0.1)


def recompute_at_failure(costs, trace, mode):
    """(tokens recomputed, tokens of KV held) by the failed instance's requests."""
    event = next(e for e in simulate(costs, trace, mode, KILL).log if e["kind"] == "recompute")
    return event["tokens"], event["of"]


def test_replication_recomputes_fewer_tokens_than_no_replication():
    trace = trace_at(0.7)
    kept = figures(COSTS, trace, "kevlarflow", KILL)["tokens_recomputed"]
    lost = figures(COSTS, trace, "kevlarflow-no-replication", KILL)["tokens_recomputed"]
    assert 0 < kept < lost / 2
    recomputed, held = recompute_at_failure(COSTS, trace, "kevlarflow")
    assert 0 < recomputed < held / 2
    assert recompute_at_failure(COSTS, trace, "kevlarflow-no-replication") == (held, held)


def test_replication_on_a_link_too_slow_for_the_kv_keeps_nothing():
    slow = COSTS.with_overrides(link_bytes_per_s=1e6, activation_bytes_per_token=0)
    recomputed, held = recompute_at_failure(slow, trace_at(0.7, costs=slow), "kevlarflow")
    assert recomputed == held > 0


def test_restart_hurts_latency_more_than_kevlarflow_when_loading_is_slow():
    # 40 s to load a stage; at 70% load the survivor of a restart is overloaded
    # meanwhile, while a lent worker merges two pipelines' steps.
    slow_load = COSTS.with_overrides(weight_load_bytes_per_s=0.1e9)
    trace = trace_at(0.7, duration=120.0, costs=slow_load)
    kf = figures(slow_load, trace, "kevlarflow", KILL)
    restart = figures(slow_load, trace, "restart", KILL)
    assert restart["avg_ttft_s"] > 5 * kf["avg_ttft_s"]
    assert restart["avg_latency_s"] > 1.5 * kf["avg_latency_s"]


def test_latency_rises_with_load():
    latency = [figures(COSTS, trace_at(load), "kevlarflow")["avg_latency_s"]
               for load in (0.2, 0.6, 0.9)]
    assert latency[0] < latency[1] < latency[2]


def test_twice_the_capacity_builds_a_queue_and_less_does_not():
    def ttft_growth(load):
        sim = simulate(COSTS, trace_at(load, duration=40.0), "kevlarflow")
        ttft = [r["first_s"] - r["arrival_s"] for r in sim.requests()]
        quarter = len(ttft) // 4
        return sum(ttft[-quarter:]) / sum(ttft[:quarter])

    assert ttft_growth(2.0) > 4
    assert ttft_growth(0.5) < 3


def test_a_paper_trace_of_30_minutes_simulates_in_seconds():
    import time

    costs = PRESETS["paper"]
    trace = sharegpt_like(0.7 * capacity_requests_per_s(costs, 256, 256), 1800, 256, 256)
    start = time.perf_counter()
    f = figures(costs, trace, "kevlarflow", [Failure(300, 0, 1)])
    assert time.perf_counter() - start < 10
    assert f["requests_failed"] == 0 and len(trace) > 10_000


def test_a_replacement_ready_before_the_rebuild_still_moves_back_once():
    quick = COSTS.with_overrides(process_start_s=0, worker_init_s=0, weight_bytes_per_stage=1e6,
                                 comm_build_s=2.0)
    sim = simulate(quick, trace_at(0.5, costs=quick), "kevlarflow", KILL)
    kinds = [e["kind"] for e in sim.log]
    assert kinds.index("resumed") < kinds.index("rejoined") and kinds.count("rejoined") == 1
    assert all(r["last_s"] is not None for r in sim.requests())


def test_a_failure_outside_the_deployment_is_refused():
    with pytest.raises(ValueError, match="no such worker"):
        simulate(COSTS, trace_at(0.5), "kevlarflow", [Failure(1.0, 0, 5)])
    with pytest.raises(ValueError, match="at least 2 instances"):
        simulate(COSTS.with_overrides(instances=1), [TraceRequest(0, 8, 8)], "kevlarflow", KILL)


# Metrics --------------------------------------------------------------------------------

def test_metrics_follow_the_real_benchmarks_definitions():
    reqs = [dict(arrival_s=0.0, first_s=1.0, last_s=3.0, tokens=5),
            dict(arrival_s=1.0, first_s=1.5, last_s=2.0, tokens=1),
            dict(arrival_s=2.0, first_s=None, last_s=None, tokens=4)]
    f = summarize(reqs, None, 0)
    assert f["avg_latency_s"] == pytest.approx(2.0)
    assert f["avg_ttft_s"] == pytest.approx(0.75)
    assert f["mean_tpot_s"] == pytest.approx(0.5)  # only the request of 5 tokens counts
    assert f["requests_failed"] == 1
    assert percentile(list(range(100)), 0.99) == 99
    assert percentile([3.0, 1.0], 0.99) == 3.0


# Costs files ----------------------------------------------------------------------------

def write_costs(tmp_path, **changes):
    data = {**COSTS.to_json(), **changes}
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    return path


def test_a_costs_file_round_trips(tmp_path):
    assert load_file(write_costs(tmp_path)) == COSTS


@pytest.mark.parametrize("changes, message", [
    (dict(comm_build_s=None), "missing field.*comm_build_s"),
    (dict(comm_build_s=-1.0), "comm_build_s must not be negative"),
    (dict(typo_s=1.0), r"unknown field.*typo_s"),
    (dict(stages=0), "stages must be a positive integer"),
    (dict(instances=1.5), "instances must be a positive integer"),
    (dict(link_bytes_per_s=0), "link_bytes_per_s must be positive"),
    (dict(step_base_s="fast"), "step_base_s must be a finite number"),
])
def test_a_bad_costs_file_is_refused_with_a_message(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_file(write_costs(tmp_path, **changes))


def test_a_costs_file_that_is_not_json_or_not_an_object_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_file(path)
    with pytest.raises(ValueError, match="JSON object"):
        from_dict([1, 2], "x")
    assert len(FIELDS) == len(COSTS.to_json())


def test_unknown_overrides_are_refused():
    with pytest.raises(ValueError, match="unknown cost field"):
        COSTS.with_overrides(stagez=3)
    with pytest.raises(SystemExit):
        simulate_cli.main(["--set", "nope=1", "--duration", "10", "--fail-at", "5"])


# Validation against a real run ------------------------------------------------------------

# Like this machine's CPU workers: requests overlap the fixture's failure.
CPU_LIKE = COSTS.with_overrides(step_base_s=0.06, step_prefill_token_s=1e-3, step_decode_token_s=1.4e-3)


def test_validate_compares_every_mode_with_the_measured_figures():
    run = read_run(FIXTURE)
    table = compare(run, CPU_LIKE, fit=False)["modes"]
    assert set(table) == set(MODES)
    row = table["restart"]["failure"]["mttr_s"]
    assert row["measured"] == 5.5
    assert row["rel_error"] == pytest.approx((row["simulated"] - 5.5) / 5.5)
    assert table["kevlarflow"]["fault_free"]["mttr_s"]["rel_error"] is None  # not applicable
    # The run's deployment replaces the costs' own (here: the same 2 x 2).
    assert all(r["simulated"] is not None for r in table["kevlarflow"]["failure"].values())


def test_the_simulator_predicts_a_recorded_run_within_its_documented_error():
    """The figures docs/simulator.md states for this recorded run: a mean
    error of 13% over the predicted figures (the fitted one left out), the
    worst MTTR 26% off. A change to the model that predicts worse fails."""
    result = compare(read_run(DEMO_RUN), load_file(DEMO_COSTS))
    errors = prediction_errors(result["modes"])
    fitted = [(m, c, k) for m, by_c in result["modes"].items() for c, rows in by_c.items()
              for k, r in rows.items() if r["fitted"]]
    assert fitted == [("restart", "fault_free", "mean_tpot_s")] and len(errors) == 32
    assert sum(abs(e) for *_, e in errors) / len(errors) <= 0.14
    mttr = [abs(e) for _, _, key, e in errors if key == "mttr_s"]
    assert len(mttr) == 3 and max(mttr) <= 0.28


# The `make demo` of the pinned small deployment at its two settings, and the
# costs `--calibrate --preset small` measured just after it on the same
# machine: the validation docs/simulator.md gives for each setting.
SMALL_COSTS = Path(__file__).parent / "data" / "demo_costs_small.json"


@pytest.mark.parametrize("setting,mean_error", [("same_machine", 0.13), ("new_node", 0.105)])
def test_the_simulator_predicts_both_demo_settings_within_their_documented_error(setting,
                                                                                  mean_error):
    """docs/simulator.md: a mean error of 12% at the same-machine point and
    10% at the new-node one (where the survivor of a restart queues, in the
    real run and in the model). A model that predicts worse fails."""
    run = read_run(Path(__file__).parent / "data" / f"demo_run_small_{setting}.json")
    assert run["config"]["instance_cpus"] and run["config"]["replacement_delay_s"] == \
        (0 if setting == "same_machine" else 30)
    # The fault-free figures are medians over the run's own fault-free rounds,
    # whose traces are drawn again from the recorded seeds.
    assert len(run["fault_free_traces"]) == 8
    errors = prediction_errors(compare(run, load_file(SMALL_COSTS))["modes"])
    assert len(errors) == 21
    assert sum(abs(e) for *_, e in errors) / len(errors) <= mean_error


def test_validate_refuses_another_schema(tmp_path):
    data = json.loads(FIXTURE.read_text())
    data["schema"] = "something/else"
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema"):
        read_run(path)
    del data["schema"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing 'schema'"):
        read_run(path)


def test_validate_from_the_command_line_writes_its_json(tmp_path, capsys):
    costs = write_costs(tmp_path, **CPU_LIKE.to_json())
    out = tmp_path / "validation.json"
    simulate_cli.main(["--validate", str(FIXTURE), "--costs", str(costs), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "mean absolute relative error" in printed and "restart" in printed
    data = json.loads(out.read_text())
    assert data["validation"]["restart"]["failure"]["mttr_s"]["measured"] == 5.5
    assert data["contention"] > 0


def test_validate_fits_one_contention_factor_on_the_baseline_tpot():
    run = read_run(FIXTURE)
    result = compare(run, CPU_LIKE)
    tpot = result["modes"]["restart"]["fault_free"]["mean_tpot_s"]
    assert tpot["fitted"] and tpot["rel_error"] == pytest.approx(0, abs=0.02)
    assert sum(r["fitted"] for m in result["modes"].values() for c in m.values()
               for r in c.values()) == 1
    # Costs twice as fast need (about) twice the contention to match the same run.
    faster = CPU_LIKE.contended(0.5)
    assert compare(run, faster)["contention"] == pytest.approx(2 * result["contention"], rel=0.05)
    with pytest.raises(ValueError, match="positive"):
        CPU_LIKE.contended(0)


def test_the_step_fit_recovers_known_costs_and_flags_what_it_cannot_tell():
    import numpy as np

    from kevlarflow.bench.sim.calibrate import DECODE_BATCHES, MIXED, PREFILL_SIZES, fit_step_costs

    design = [(1.0, n, 0) for n in PREFILL_SIZES] + [(1.0, 0, b) for b in DECODE_BATCHES] + \
        [(1.0, p, d) for p, d in MIXED]
    rows = np.array(design, dtype=float)
    exact = rows @ np.array([0.005, 0.0002, 0.001])
    fit = fit_step_costs(rows, exact)
    assert (fit["base"], fit["prefill"], fit["decode"]) == pytest.approx((0.005, 0.0002, 0.001))
    assert fit["doubts"] == [] and fit["worst_residual"] < 1e-9
    # 5% noise: still told apart.
    noisy = exact * (1 + 0.05 * np.random.default_rng(0).standard_normal(len(exact)))
    fit = fit_step_costs(rows, noisy)
    assert fit["doubts"] == [] and fit["prefill"] == pytest.approx(0.0002, rel=0.25)
    # Steps whose times have nothing to do with their tokens: flagged.
    erratic = np.random.default_rng(1).uniform(0.01, 0.1, len(exact))
    assert fit_step_costs(rows, erratic)["doubts"]


def test_calibration_measures_this_machine_and_the_simulator_takes_it(tmp_path):
    """--calibrate on the tiny checkpoint: every cost measured and plausible,
    written where `--costs local` finds it, and usable as is."""
    env = dict(os.environ, KEVLARFLOW_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "costs.json"
    proc = subprocess.run([sys.executable, "-m", "kevlarflow", "bench", "simulate", "--calibrate",
                           "--preset", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    costs = load_file(out)
    assert load_file(tmp_path / "cache" / "sim-costs-local.json") == costs
    assert 0.05 < costs.process_start_s < 60 and costs.cpu_cores >= 1
    assert costs.weight_bytes_per_stage > 0 and costs.weight_load_bytes_per_s > 0
    assert costs.step_base_s > 0 and costs.step_prefill_token_s > 0
    assert costs.kv_bytes_per_token_per_stage > 0 and costs.link_bytes_per_s > 0
    proc = subprocess.run([sys.executable, "-m", "kevlarflow", "bench", "simulate", "--costs",
                           "local", "--duration", "20", "--fail-at", "10", "--mean-prompt", "32",
                           "--mean-output", "16"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "restart / mode" in proc.stdout


# The command line -----------------------------------------------------------------------

def test_the_paper_projection_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "paper.json"
    simulate_cli.main(["--costs", "paper", "--duration", "600", "--fail-at", "100",
                       "--json", str(out)])
    printed = capsys.readouterr().out
    assert "restart / mode" in printed and "[378.9x]" in printed and "about 10 min" in printed
    data = json.loads(out.read_text())
    assert set(data["results"]) == set(MODES)
    assert data["results"]["restart"]["failure"]["mttr_s"] > 60
    assert data["ratios"]["kevlarflow"]["mttr_s"] > 10
    assert 0.65 < data["trace"]["rate"] / data["trace"]["capacity_requests_per_s"] < 0.75


def test_a_lender_holds_its_rounds_for_the_first_step_after_a_reroute():
    """ft/recovery.py `yields`: the first step of the instance that resumed
    runs alone at the lent worker, so MTTR is detection + communicator + one
    trip of its own micro-batch, not a merged round of both instances."""
    trace = [TraceRequest(0.05 * i, 64, 64) for i in range(60)]
    costs = COSTS.with_overrides(cpu_cores=2, pinned_instances=1)
    sim = simulate(costs, trace, "kevlarflow", [Failure(1.0, 0, 1)])
    own = costs.detect_kill_s + costs.comm_build_s
    # at most one trip of the whole budget through the stages
    assert own < sim.mttr_s[0] <= own + costs.stages * costs.stage_step_s(
        costs.max_num_batched_tokens, 0)

