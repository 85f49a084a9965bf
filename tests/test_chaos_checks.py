"""The chaos run's invariants, on recorded runs made up here: a request may
fail only once an outage (a stage with no live or ready worker) has lasted
the deployment's outage timeout, and only with the server's clear error;
recovery from the last fault ends when every instance serves, a move back
just after it being no gap."""
import pytest

from kevlarflow.bench.chaos import checks
from kevlarflow.bench.chaos.clients import RequestRecord

ENGINE_FAILED = "the request failed in the engine (a worker failure left no instance to finish it)"
REFUSED = "no pipeline instance is serving; retry once a replacement worker has joined"


def sample(t, live=True, phases=("serving", "serving")):
    return dict(t_s=t, every_stage_live=live, phases=list(phases))


def failed(end_s, error=ENGINE_FAILED, status=200):
    return RequestRecord(client=0, prompt=[16], max_tokens=4, start_s=0.0, end_s=end_s,
                         status=status, error=error)


def test_outages_come_from_samples_and_events_merged():
    samples = [sample(t / 4) for t in range(40)]
    for k in range(8, 16):  # 2.0 to 4.0 s: no live worker for a stage
        samples[k] = sample(k / 4, live=False)
    for k in range(16, 24):  # then its replacement loads: live, not ready
        samples[k] = sample(k / 4, phases=("down", "down"))
    events = [dict(kind="requests_held", t_s=1.9, instance=0, detail="3 requests: no live "
                   "worker for stage 1; they wait"),
              dict(kind="resumed", t_s=6.1, instance=0, detail="")]
    assert checks.uncovered(samples, events) == [(1.9, 6.1)]


def test_a_failure_is_excused_only_once_the_outage_outlasted_the_timeout():
    periods = [(10.0, 50.0)]
    early, late = failed(12.0), failed(41.0)
    assert not checks.failures([early], periods, 30.0)["ok"]
    assert checks.failures([late], periods, 30.0)["ok"]
    assert checks.failures([early], periods, 0.0)["ok"]  # requests fail at once then
    assert not checks.failures([failed(55.0)], periods, 0.0)["ok"]  # after the outage
    # Never a timeout, nor another error, even late in an outage.
    assert not checks.failures([failed(41.0, error="no answer within 120 s")], periods, 30.0)["ok"]


def test_a_503_is_excused_only_once_the_outage_outlasted_the_timeout():
    periods = [(10.0, 50.0)]
    refused = [failed(20.0, error=REFUSED, status=503)]
    assert checks.no_503(refused, periods, 30.0)["value"] == 1
    assert checks.no_503(refused, periods, 5.0)["ok"]
    assert checks.failures(refused, periods, 5.0)["ok"]


def test_a_move_back_after_the_last_fault_is_no_gap_in_serving():
    """The last fault's recovery ends with the instance's "resumed"; a move
    back to a replacement just after it resumes again, on purpose, and
    counts as no gap (as its samples do)."""
    from kevlarflow.bench.chaos.faults import Fault

    def status(t, serving=True, moving_back=False):
        return dict(t_s=t, serving=[serving, True], moving_back=[moving_back, False],
                    home=[True, True], states={"w0.0": "ready"})
    samples = ([status(t / 4) for t in range(4)] + [status(1 + t / 4, serving=False)
                                                      for t in range(12)]
               + [status(4 + t / 4, serving=False, moving_back=True) for t in range(4)]
               + [status(5 + t / 4) for t in range(8)])
    faults = [Fault(t_s=1.0, scenario="any", worker="w0.0", kind="hang", injected=True)]
    resumed = [dict(kind="resumed", t_s=4.6, instance=0, detail="w0.0 -> w1.1"),
               dict(kind="resumed", t_s=6.1, instance=0, detail="w0.0 -> w0.1 (moving back)")]
    check = checks.recovered(samples, faults, resumed, 5.0)
    assert check["ok"] and check["value"]["all_serving_s"] == pytest.approx(3.6), check
    # Not so for a resume that ends a gap of another kind.
    resumed[1]["detail"] = "w0.0 -> w0.1"
    check = checks.recovered(samples, faults, resumed, 5.0)
    assert not check["ok"] and check["value"]["all_serving_s"] == pytest.approx(5.1), check


def test_the_wait_for_a_replacement_to_load_is_not_recovery_s_time():
    """The last fault leaves a stage with no ready worker: nothing serves
    until its replacement loads (3.5 s here), and the target bounds what
    recovery takes after that, not the load. Past the target, it fails."""
    from kevlarflow.bench.chaos.faults import Fault

    def status(t, serving, ready):
        return dict(t_s=t, serving=[serving, True], moving_back=[False, False],
                    home=[True, True], states={"w0.0": "ready"}, every_stage_ready=ready)

    def run(resumed_at):
        samples = [status(t / 4, serving=not 1 <= t / 4 < resumed_at, ready=not 2 <= t / 4 < 5.5)
                   for t in range(80)]
        resumed = [dict(kind="resumed", t_s=resumed_at, instance=0, detail="w0.0 -> w0.1")]
        return checks.recovered(samples, faults, resumed, 5.0)

    faults = [Fault(t_s=1.0, scenario="any", worker="w0.1", kind="hang", injected=True)]
    check = run(resumed_at=7.5)
    assert check["ok"], check
    assert check["value"]["all_serving_s"] == pytest.approx(6.5)
    assert check["value"]["no_ready_worker_s"] == pytest.approx(4.5)
    check = run(resumed_at=11.5)  # 6 s after the replacement loaded
    assert not check["ok"] and check["value"]["all_serving_s"] == pytest.approx(10.5), check
