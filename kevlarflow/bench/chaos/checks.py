"""The invariants a chaos run must keep, each checked from what the run
recorded: the clients' streams, the /status samples, the resource samples
and how the server stopped.

    outputs        every completed request streamed exactly the failure-free
                   greedy tokens (none missing, none twice, none different),
                   but where the reference itself had a near-tie
    failures       a request fails only once some stage has had no live
                   worker for the server's outage timeout (until then its
                   requests wait for one), with a clear error; never a timeout
    no_503         no request refused before such an outage timed out
    recovered      every instance serving again within `recovery_s` of the
                   last fault, less any time a stage then had no ready
                   worker at all (a replacement loading), and back on its
                   own workers eventually
    end_state      /health "ok" at the end, every slot on its own worker
    idle_pools     no KV block in use once the last request ended
    clean_stop     SIGTERM stops the server within its grace, with no
                   traceback in its log, and no process of it outlives it
    no_leaks       threads and file descriptors of the controller and of
                   the workers back where they were when the run started
    memory         the controller's memory does not grow with the run
"""
from __future__ import annotations

import signal
import statistics

from kevlarflow.ft.recovery import MOVING_BACK

COVER_SLACK_S = 0.5       # between the controller failing a request and its client seeing it
STATUS_SLACK_S = 0.5      # how late the /status samples may see an outage begin
THREAD_SLACK = 2
FD_SLACK = 8
MEMORY_SLACK_MB = 64.0


def _check(ok: bool, value, detail: str = "") -> dict:
    return dict(ok=bool(ok), value=value, detail=detail)


def uncovered(samples: list[dict], events: list[dict]) -> list[tuple[float, float]]:
    """The outages: periods when some stage had no live worker, or no ready
    one (an instance "down"), merged. From the status samples that say so,
    and, for periods too short for the samples, the controller's own word:
    from an instance's requests being held or failed for want of a live
    worker to its next "resumed"."""
    periods = [(a["t_s"], b["t_s"]) for a, b in zip(samples, samples[1:])
               if not a["every_stage_live"] or "down" in a["phases"]]
    for k, e in enumerate(events):
        if e["kind"] in ("requests_held", "requests_failed") and "no live worker" in e["detail"]:
            end = next((f["t_s"] for f in events[k:] if f["kind"] == "resumed"
                        and f["instance"] == e["instance"]), e["t_s"])
            periods.append((e["t_s"], end))
    merged = []
    for a, b in sorted(periods):
        if merged and a <= merged[-1][1] + COVER_SLACK_S:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _during(periods, t: float, wait_s: float = 0.0) -> bool:
    """t falls in an outage that had lasted wait_s by then."""
    return any(a - COVER_SLACK_S <= t <= b + COVER_SLACK_S
               and t - a >= wait_s - STATUS_SLACK_S - COVER_SLACK_S for a, b in periods)


def first_difference(got: list[int], want: list[int]) -> int | None:
    if got == want:
        return None
    return next((k for k, (a, b) in enumerate(zip(got, want)) if a != b),
                min(len(got), len(want)))


def outputs(records, expected: dict, near_tie: float) -> dict:
    """Each completed stream against the failure-free output. A stream may
    part from it only where the reference's top choice was a near-tie (the
    streamed token's logprob within near_tie of the best): forward passes
    in other batches round differently, so which of two equal tokens wins
    is not a property of recovery. Anything else is wrong."""
    done = [r for r in records if r.ok]
    wrong, tied, miscounted = [], [], []
    for r in done:
        want, tops = expected[(tuple(r.prompt), r.max_tokens)]
        k = first_difference(r.token_ids, want)
        if k is None:
            continue
        miss = len(r.token_ids) != r.max_tokens
        if miss:
            miscounted.append(r)
        top = dict(tops[k]) if k < len(tops) and k < len(r.token_ids) else {}
        best = max(top.values(), default=None)
        served = top.get(r.token_ids[k]) if k < len(r.token_ids) else None
        if miss or served is None or best - served > near_tie:
            wrong.append((r, k))
        else:
            tied.append(r)
    detail = ""
    if wrong:
        r, k = wrong[0]
        detail = (f"{len(wrong)} of {len(done)} differ ({len(miscounted)} with a token missing "
                  f"or repeated); e.g. client {r.client} at {r.start_s:.1f} s from token {k}")
    value = dict(completed=len(done), exact=len(done) - len(wrong) - len(tied),
                 parted_at_a_near_tie=len(tied), wrong=len(wrong),
                 missing_or_repeated=len(miscounted))
    return _check(not wrong and done, value, detail)


# The server's words for "no live worker could take it": the only failures
# a deployment that lost a whole stage may give.
EXCUSES = ("a worker failure left no instance to finish it", "no pipeline instance is serving")


def failures(records, periods, outage_timeout_s: float) -> dict:
    """Requests wait out an outage for outage_timeout_s: a failure before
    that is unexcused."""
    failed = [r for r in records if not r.ok]
    unexcused = [r for r in failed if not any(e in r.error for e in EXCUSES)
                 or not _during(periods, r.end_s, outage_timeout_s)]
    detail = f"e.g. {unexcused[0].error[:160]!r} at {unexcused[0].end_s:.1f} s" if unexcused else ""
    return _check(not unexcused, dict(failed=len(failed), unexcused=len(unexcused)), detail)


def no_503(records, periods, outage_timeout_s: float) -> dict:
    refused = [r for r in records if r.status == 503
               and not _during(periods, r.end_s, outage_timeout_s)]
    return _check(not refused, len(refused),
                  f"first at {refused[0].end_s:.1f} s" if refused else "")


def _settled_after(samples, last: float, good) -> float | None:
    """Seconds from `last` until the samples after it are good for good:
    0 if none after it is bad; None if the last one is bad."""
    after = [s for s in samples if s["t_s"] >= last]
    bad = [k for k, s in enumerate(after) if not good(s)]
    if not bad:
        return 0.0
    if bad[-1] + 1 >= len(after):
        return None
    return after[bad[-1] + 1]["t_s"] - last


def recovered(samples, faults, events, limit_s: float) -> dict:
    """From the last fault until every instance serves again (the later of
    the last gap in the status samples and the last "resumed" event after
    it; a move back to a replacement is no gap, in either: its "resumed"
    says so), and until every slot is back on its own worker.

    The target bounds recovery's own part: when the last fault left a stage
    with no ready worker anywhere, nothing can serve until a replacement has
    loaded (its checkpoint, the machine's speed, a replacement delay), so
    the time until every stage had a ready worker again is taken out."""
    injected = [f.t_s for f in faults if f.injected]
    if not injected:
        return _check(False, None, "no fault was injected")
    last = max(injected)
    serving = _settled_after(samples, last, lambda s: all(
        a or b for a, b in zip(s["serving"], s["moving_back"])))
    resumed = [e["t_s"] - last for e in events if e["kind"] == "resumed" and e["t_s"] >= last
               and not e.get("detail", "").endswith(f"({MOVING_BACK})")]
    if serving is not None and resumed:
        serving = max(serving, max(resumed))
    home = _settled_after(samples, last, lambda s: all(s["serving"]) and all(s["home"]) and all(
        v == "ready" for v in s["states"].values()))
    # (Samples of older runs lack the key: nothing is taken out of theirs.)
    loading = _settled_after(samples, last, lambda s: s.get("every_stage_ready", True))
    own = None if serving is None or loading is None else max(0.0, serving - loading)
    ok = own is not None and own <= limit_s and home is not None
    return _check(ok, dict(all_serving_s=serving, no_ready_worker_s=loading, all_home_s=home),
                  f"target: all serving within {limit_s:g} s of the last fault, less the time "
                  "some stage had no ready worker")


def end_state(final: dict, health: tuple[int, dict]) -> dict:
    code, body = health
    home = all(final["home"]) and all(v == "ready" for v in final["states"].values())
    ok = code == 200 and body.get("status") == "ok" and home
    return _check(ok, dict(health=body.get("status"), every_slot_home=home),
                  body.get("reason", ""))


def idle_pools(final: dict) -> dict:
    value = dict(requests=final["requests"], blocks_used=final["blocks_used"],
                 replica_blocks_used=final["replica_blocks_used"])
    return _check(not any(value.values()), value)


def clean_stop(stopped: dict, grace_s: float) -> dict:
    """uvicorn ends a graceful shutdown by raising the signal it caught again,
    so a server stopped by SIGTERM exits "by SIGTERM" (-15) once it is done."""
    ok = stopped["exit_code"] in (0, -signal.SIGTERM) and stopped["stop_s"] <= grace_s \
        and not stopped["orphans"] and not stopped["tracebacks"]
    return _check(ok, stopped)


def no_leaks(start, end) -> dict:
    """start, end: Usage samples taken idle, every slot on its own worker."""
    if start is None or end is None:
        return _check(False, None, "no resource sample")
    worker_start = max(start.workers.values(), default=(0, 0))
    worker_end = max(end.workers.values(), default=(0, 0))
    value = dict(controller_threads=[start.threads, end.threads],
                 controller_fds=[start.fds, end.fds],
                 worker_threads_max=[worker_start[0], worker_end[0]],
                 worker_fds_max=[worker_start[1], worker_end[1]])
    ok = end.threads <= start.threads + THREAD_SLACK and end.fds <= start.fds + FD_SLACK and \
        worker_end[0] <= worker_start[0] + THREAD_SLACK and \
        worker_end[1] <= worker_start[1] + FD_SLACK
    return _check(ok, value, "[at the start, at the end]")


def memory(usage) -> dict:
    rss = [u.rss_mb for u in usage]
    if len(rss) < 10:
        return _check(False, None, "too few samples")
    early = max(rss[len(rss) // 10: len(rss) * 4 // 10])
    late = statistics.median(rss[len(rss) * 8 // 10:])
    return _check(late <= early + MEMORY_SLACK_MB,
                  dict(early_peak_mb=round(early, 1), late_median_mb=round(late, 1),
                       peak_mb=round(max(rss), 1)),
                  f"late median within {MEMORY_SLACK_MB:g} MB of the early peak")
