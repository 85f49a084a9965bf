"""One run of the failover benchmark: a fresh deployment replays a trace in
real time, delivers the failure schedule's faults, and records what every
request saw (the time of each of its tokens) and every recovery event."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

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

    def start(self, mode: str):
        from kevlarflow import LLM

        return LLM(self.model, num_instances=self.num_instances, pp_size=self.pp_size,
                   max_num_batched_tokens=self.max_num_batched_tokens,
                   kv_cache_memory=self.kv_cache_memory,
                   replication_interval_s=self.replication_interval_s,
                   replacement_delay_s=self.replacement_delay_s, load_progress=False,
                   **MODES[mode])


def submit(engine, req: Request):
    """Greedy, and exactly output_len tokens: every mode does the same work."""
    from kevlarflow import SamplingParams

    return engine.add_request(req.prompt, SamplingParams(max_tokens=req.output_len,
                                                         temperature=0, ignore_eos=True))


def replay(deployment: Deployment, mode: str, trace: list[Request], failures: list[Failure],
           label: str = "") -> dict:
    """Serve the trace on a fresh deployment of `mode`; the run's record (see
    docs/failover-benchmark.md for its fields). Times are seconds from the
    start of the trace."""
    for f in failures:
        if not (0 <= f.instance < deployment.num_instances and 0 <= f.stage < deployment.pp_size):
            raise ValueError(f"no worker at instance {f.instance}, stage {f.stage}")
    llm = deployment.start(mode)
    engine = llm.engine
    pending, schedule = list(trace), sorted(failures, key=lambda f: f.at_s)
    seqs, records, lags, next_lag = [], {}, [], 0.0
    bar = tqdm(total=len(trace), desc=label or mode, unit="req", leave=False, dynamic_ncols=True)
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
        for seq in seqs:  # requests failed by the engine may end without an output
            records[seq.request_id]["finish_reason"] = seq.finish_reason
        stats = engine.status().stats
        return dict(
            elapsed_s=time.time() - start,
            requests=[records[seq.request_id] for seq in seqs],
            events=[dict(kind=e.kind, t_s=e.time - start, worker=e.worker, instance=e.instance,
                         detail=e.detail) for e in engine.events.events],
            **{k: stats[k] for k in ("tokens_recomputed", "tokens_restored", "requests_restored",
                                     "bytes_replicated")},
            lag_tokens=lags)
    finally:
        bar.close()
        llm.shutdown()


def capacity(deployment: Deployment, trace: list[Request], label: str = "capacity") -> float:
    """Requests per second the fault-free deployment sustains: every request
    of the trace at once, on the plain system (no replication)."""
    with deployment.start("restart") as llm:
        engine = llm.engine
        bar = tqdm(total=len(trace), desc=label, unit="req", leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        for req in trace:
            submit(engine, req)
        while engine.has_unfinished():
            bar.update(sum(out.finished for out in engine.step()))
        bar.close()
        return len(trace) / (time.perf_counter() - start)
