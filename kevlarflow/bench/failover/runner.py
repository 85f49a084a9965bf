"""One run of the failover benchmark: a fresh deployment replays a trace in
real time, delivers the failure schedule's faults, and records what every
request saw (the time of each of its tokens) and every recovery event."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import psutil
from tqdm import tqdm

from kevlarflow.bench.trace import Request

MODES = {  # name -> deployment options
    "kevlarflow": dict(recovery="kevlarflow"),
    "kevlarflow-no-replication": dict(recovery="kevlarflow", replica_memory=0),
    "restart": dict(recovery="restart"),
}
LAG_SAMPLE_S = 0.1  # replication lag is sampled: computing it costs the controller time
STEP_TIMEOUT_S = 0.02


@dataclass(frozen=True)
class Failure:
    at_s: float       # seconds into the trace
    instance: int
    stage: int
    kind: str         # "kill" (SIGKILL) or "hang" (SIGSTOP)

    @classmethod
    def parse(cls, text: str) -> "Failure":
        """AT:INSTANCE:STAGE[:KIND], e.g. 15:0:1:kill."""
        parts = text.split(":")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            failure = cls(float(parts[0]), int(parts[1]), int(parts[2]),
                          parts[3] if len(parts) == 4 else "kill")
        except ValueError:
            raise ValueError(f"a failure is AT:INSTANCE:STAGE[:KIND], e.g. 15:0:1:kill; "
                             f"got {text!r}") from None
        if failure.kind not in ("kill", "hang") or failure.at_s < 0:
            raise ValueError(f"{text!r}: the kind is kill or hang, the time >= 0")
        return failure

    def as_json(self) -> dict:
        return asdict(self)


@dataclass
class Deployment:
    """The engine options every mode shares."""
    model: str
    num_instances: int = 2
    pp_size: int = 2
    max_num_batched_tokens: int = 256
    kv_cache_memory: int = 256 << 20
    replication_interval_s: float = 0.5
    replacement_delay_s: float = 0.0
    instance_cpus: tuple[tuple[int, ...], ...] | None = None
    device: str = "cpu"                 # or "cuda": the workers round-robin over the GPUs
    enforce_eager: bool = False         # on cuda: no decode step from a CUDA graph

    def start(self, mode: str):
        from kevlarflow import LLM

        return LLM(self.model, num_instances=self.num_instances, pp_size=self.pp_size,
                   max_num_batched_tokens=self.max_num_batched_tokens,
                   kv_cache_memory=self.kv_cache_memory,
                   replication_interval_s=self.replication_interval_s,
                   replacement_delay_s=self.replacement_delay_s,
                   instance_cpus=self.instance_cpus, device=self.device,
                   enforce_eager=self.enforce_eager, load_progress=False,
                   **MODES[mode])


def split_cpus(num_instances: int) -> tuple[tuple[int, ...], ...]:
    """This process's CPUs, split evenly among the instances (an instance per
    CPU, round robin, where there are fewer CPUs than instances)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < num_instances:
        return tuple((c,) for c in cpus)
    k = len(cpus) // num_instances
    return tuple(tuple(cpus[i * k:(i + 1) * k]) for i in range(num_instances))


def submit(engine, req: Request):
    """Greedy, and exactly output_len tokens: every mode does the same work."""
    from kevlarflow import SamplingParams

    return engine.add_request(req.prompt, SamplingParams(max_tokens=req.output_len,
                                                         temperature=0, ignore_eos=True))


def replay(deployment: Deployment, mode: str, trace: list[Request], failures: list[Failure],
           label: str = "") -> dict:
    """Serve the trace on a fresh deployment of `mode`; the run's record (see
    docs/failover-benchmark.md for its fields)."""
    for f in failures:
        if not (0 <= f.instance < deployment.num_instances and 0 <= f.stage < deployment.pp_size):
            raise ValueError(f"no worker at instance {f.instance}, stage {f.stage}")
    llm = deployment.start(mode)
    try:
        return serve(llm.engine, trace, failures, label or mode)
    finally:
        llm.shutdown()


def serve(engine, trace: list[Request], failures: list[Failure], label: str) -> dict:
    """Serve the trace in real time on a running engine and deliver the
    failures; the run's record. Times are seconds from the start of the
    trace; events and counters are those of this run only."""
    pending, schedule = list(trace), sorted(failures, key=lambda f: f.at_s)
    seqs, records, lags, next_lag = [], {}, [], 0.0
    counters = ("tokens_recomputed", "tokens_restored", "requests_restored", "bytes_replicated")
    status = engine.status()
    before, replication_before = status.stats, status.replication_totals
    cpu_before, own_before = worker_cpu_s(engine), time.process_time()
    bar = tqdm(total=len(trace), desc=label, unit="req", leave=False, dynamic_ncols=True)
    try:
        start = time.time()
        while pending or schedule or engine.has_unfinished():
            now = time.time() - start
            while pending and pending[0].arrival_s <= now:
                req = pending.pop(0)
                seq = submit(engine, req)
                seqs.append(seq)
                records[seq.request_id] = dict(
                    arrival_s=req.arrival_s, prompt_tokens=len(req.prompt),
                    output_tokens=req.output_len, token_times_s=[], finish_reason=None,
                    instance=engine.owner[seq].index)
            while schedule and schedule[0].at_s <= now:
                f = schedule.pop(0)
                engine.inject_fault(f.instance, f.stage, f.kind)
            for out in engine.step(timeout_s=STEP_TIMEOUT_S):
                rec = records[out.request_id]
                rec["token_times_s"] += [time.time() - start] * len(out.new_token_ids)
                if out.finished:
                    rec["finish_reason"] = out.finish_reason
                    bar.update(1)
            if time.monotonic() >= next_lag:
                lags += engine.status().lag_tokens
                next_lag = time.monotonic() + LAG_SAMPLE_S
    finally:
        bar.close()
    for seq in seqs:  # requests failed by the engine may end without an output
        records[seq.request_id]["finish_reason"] = seq.finish_reason
    status = engine.status()
    stats = status.stats
    cpu_after = worker_cpu_s(engine)
    return dict(
        elapsed_s=time.time() - start,
        # CPU seconds of the workers there from start to end, and of this
        # process (the controller): where a fault-free cost goes.
        worker_cpu_s=sum(cpu_after[pid] - cpu_before[pid] for pid in cpu_after
                         if pid in cpu_before),
        controller_cpu_s=time.process_time() - own_before,
        requests=[records[seq.request_id] for seq in seqs],
        events=[dict(kind=e.kind, t_s=e.time - start, worker=e.worker, instance=e.instance,
                     detail=e.detail) for e in engine.events.events if e.time >= start],
        **{k: stats[k] - before[k] for k in counters},
        # Replication's work, as the workers' heartbeats report it.
        replication={k: v - replication_before[k] for k, v in status.replication_totals.items()},
        lag_tokens=lags)


def worker_cpu_s(engine) -> dict[int, float]:
    """CPU seconds (user + system, every thread) of each local worker process."""
    launcher = getattr(engine, "launcher", None)
    out = {}
    for proc in list(launcher.procs.values()) if launcher else []:
        try:
            times = psutil.Process(proc.pid).cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        out[proc.pid] = times.user + times.system
    return out


def capacity(deployment: Deployment, requests: Iterator[Request], warmup: int, timed: int,
             min_seconds: float, in_flight: tuple[int, ...], gain: float = 1.1,
             label: str = "capacity", queued_from: int = 0) -> dict:
    """Output tokens per second, and from them requests per second, that the
    fault-free plain system (no replication) sustains at saturation. A closed
    loop keeps k requests of the trace's lengths in flight, for each k of
    `in_flight` in turn while the rate still grows by `gain` (a larger batch
    costs little more per step until the hardware is busy), and at least up
    to queued_from: below it every request runs at once and none waits, so
    the steps are not yet as full as a queue makes them. At each k, after
    max(warmup, k / 4) completions (to settle; the first level also pays
    start-up), output
    tokens are counted over at least `timed` completions and `min_seconds`.
    The capacity is the best rate over the mean output length of the
    requests submitted (counting completions instead would favour short
    requests, which finish first). `requests` is drawn from as long as the
    measurement needs. Returns {"rps", "tokens_per_s", "in_flight",
    "levels", "mean_output_tokens"}."""
    if warmup < 1 or timed < 1 or not in_flight:
        raise ValueError("a capacity measurement needs warmup >= 1, timed >= 1 and levels")
    running, levels, outputs_asked = 0, [], []
    with deployment.start("restart") as llm:
        engine = llm.engine
        for k in in_flight:
            settle = max(warmup, k // 4)  # the level's new requests get going
            bar = tqdm(total=settle + timed, desc=f"{label} ({k} in flight)", unit="req",
                       leave=False, dynamic_ncols=True)
            done, tokens, started = 0, 0, None
            while started is None or done < settle + timed or \
                    time.perf_counter() - started < min_seconds:
                while running < k:
                    req = next(requests, None)
                    if req is None:
                        raise ValueError(f"the capacity measurement ran out of requests after "
                                         f"{len(outputs_asked)}")
                    submit(engine, req)
                    outputs_asked.append(req.output_len)
                    running += 1
                outputs = engine.step()
                if started is not None:
                    tokens += sum(len(out.new_token_ids) for out in outputs)
                finished = sum(out.finished for out in outputs)
                running -= finished
                done += finished
                bar.update(finished)
                if started is None and done >= settle:
                    started = time.perf_counter()
            bar.close()
            levels.append(dict(in_flight=k, tokens_per_s=tokens / (time.perf_counter() - started)))
            if len(levels) > 1 and k >= queued_from and \
                    levels[-1]["tokens_per_s"] < gain * levels[-2]["tokens_per_s"]:
                break
    # The requests still in hand are not waited for: shutdown drops them.
    best = max(levels, key=lambda level: level["tokens_per_s"])
    mean_output = sum(outputs_asked) / len(outputs_asked)
    return dict(rps=best["tokens_per_s"] / mean_output, tokens_per_s=best["tokens_per_s"],
                in_flight=best["in_flight"], levels=levels, mean_output_tokens=mean_output)
