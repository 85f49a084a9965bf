"""`kevlarflow bench chaos`: the command line and the order of a run."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

from kevlarflow.bench.chaos import checks
from kevlarflow.bench.chaos.clients import Load, RequestRecord, client, poll_status
from kevlarflow.bench.chaos.faults import Fault, choose, times
from kevlarflow.bench.chaos.report import plot, summary
from kevlarflow.bench.chaos.server import Server

SETTLE_S = 90.0        # for the deployment to be idle and home again after the load
TOP = 5                # reference logprobs kept per position (near-ties)
# How close two logprobs are for a near-tie: rounding differences of forward
# passes in different batches, per dtype.
NEAR_TIE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 0.0625}
RESOURCES_S = 40.0     # then for abandoned builds to run out (their deadline is 30 s)


def build_parser() -> argparse.ArgumentParser:
    from kevlarflow.bench import chaos
    from kevlarflow.model.presets import FLAVOURS, PRESETS

    p = argparse.ArgumentParser(prog="kevlarflow bench chaos", description=chaos.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face model folder (default: a cached --preset)")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--flavour", default="llama", choices=sorted(FLAVOURS))
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--duration", type=float, default=150.0, help="seconds of load and faults")
    p.add_argument("--fault-every", type=float, default=5.0, help="seconds between faults")
    p.add_argument("--kinds", default="kill,hang", help="fault kinds to draw from")
    p.add_argument("--clients", type=int, default=4, help="streaming clients")
    p.add_argument("--think", type=float, default=0.5, help="mean pause between a client's "
                   "requests, seconds (exponential)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=24)
    p.add_argument("--recovery-target", type=float, default=5.0, help="seconds from the last "
                   "fault to every instance serving, less any time some stage had no ready "
                   "worker (a replacement loading)")
    p.add_argument("--hang-timeout", type=float, default=1.0)
    p.add_argument("--outage-timeout", type=float, default=30.0,
                   help="how long requests wait while a stage has no live worker (0: they "
                        "fail at once)")
    p.add_argument("--dtype", default="float32", choices=sorted(NEAR_TIE),
                   help="of the deployment and of the reference (float32: a random-weight "
                        "checkpoint in 16 bits has exact ties everywhere)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-arg", action="append", default=[],
                   help="one more option for `kevlarflow serve` (repeatable)")
    p.add_argument("--out", default="chaos-results", help="folder for the JSON, plot and log")
    return p


def parse(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.kinds = args.kinds.split(",")
    if not args.kinds or not set(args.kinds) <= {"kill", "hang"}:
        parser.error("--kinds: kill, hang or both")
    if min(args.instances, args.pp, args.clients) < 1 or args.instances * args.pp < 2:
        parser.error("need --instances, --pp and --clients >= 1, and two workers at least")
    if not args.outage_timeout >= 0:
        parser.error("need --outage-timeout >= 0")
    if not (args.duration > 0 and 0 < args.fault_every <= args.duration / 2):
        parser.error("need --duration > 0 and 0 < --fault-every <= --duration / 2")
    if args.model and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (a Hugging Face model folder)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from kevlarflow.bench.throughput import ensure_model
    from kevlarflow.model.config import ModelConfig

    model = args.model or ensure_model(args.preset, args.flavour)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = Load(args.clients, args.think, args.prompt_len, args.output_len,
                ModelConfig.from_pretrained(model).vocab_size, seed=args.seed)
    serve_args = ["--hang-timeout", str(args.hang_timeout), "--dtype", args.dtype,
                  "--outage-timeout", str(args.outage_timeout), *args.serve_arg]
    print(f"starting kevlarflow serve {model} ({args.instances} x {args.pp}); its log: "
          f"{out / 'server.log'}", flush=True)
    server = Server(model, args.instances, args.pp, serve_args, out / "server.log")
    try:
        server.wait_healthy(600)
        run = asyncio.run(_drive(args, server, load))
    finally:
        stopped = server.stop(grace_s=15.0)
    expected = references(model, args.dtype, run["records"])
    result = _result(args, model, load, run, stopped, expected)
    (out / "chaos.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "chaos-timeline.png")
    print(result["summary"])
    print(f"wrote {out / 'chaos.json'} and {out / 'chaos-timeline.png'}")
    if not result["ok"]:
        raise SystemExit(1)
    return result


async def _drive(args, server: Server, load: Load) -> dict:
    import aiohttp

    rng = random.Random(args.seed)
    schedule = times(args.duration, args.fault_every, rng)
    records: list[RequestRecord] = []
    samples, events, faults, usage = [], {}, [], []
    t0, wall0 = time.monotonic(), time.time()
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/v1/models") as r:
            model_name = (await r.json())["data"][0]["id"]
        start_usage = server.usage(0.0)
        start_details = server.workers_in_detail()  # to compare with, should resources leak
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_status(session, server.url, t0, stop, samples))
        sampler = asyncio.create_task(_sample_usage(server, t0, stop, usage))
        clients = [asyncio.create_task(client(i, session, server.url, model_name, load, t0,
                                              args.duration, records))
                   for i in range(args.clients)]
        for at in schedule:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            faults += await _inject(session, server.url, rng, args.kinds, t0)
        await asyncio.gather(*clients)
        settled = await _settle(samples, t0, SETTLE_S)
        end_usage = await _resources_back(server, start_usage, t0)
        leftovers = None
        if end_usage is not None and start_usage is not None and \
                not checks.no_leaks(start_usage, end_usage)["ok"]:
            leftovers = dict(start=start_details, end=server.workers_in_detail())
        async with session.get(server.url + "/health") as r:
            health = (r.status, await r.json())
        async with session.get(server.url + "/status") as r:
            final_status = await r.json()
        stop.set()
        await asyncio.gather(poller, sampler)
    for s in samples:
        for e in s.pop("events", []):
            events[(e["time"], e["kind"], e["worker"], e["instance"])] = e
    return dict(model_name=model_name, records=records, samples=samples, faults=faults,
                usage=usage, start_usage=start_usage, end_usage=end_usage,
                leftovers=leftovers, health=health,
                settled=settled, final=samples[-1] if samples else None,
                events=sorted((dict(e, t_s=e["time"] - wall0) for e in events.values()),
                              key=lambda e: e["t_s"]),
                stats=final_status["replication"]["stats"])


async def _inject(session, url: str, rng: random.Random, kinds: list[str], t0: float) -> list:
    async with session.get(url + "/status") as r:
        status = await r.json()
    scenario, workers = choose(rng, status)
    faults = []
    for worker in workers:
        kind = rng.choice(kinds)
        w = status["workers"][worker]
        async with session.post(url + "/v1/fault", json=dict(
                instance=w["instance"], stage=w["stage"], kind=kind)) as r:
            injected = r.status == 200
            detail = "" if injected else (await r.text())[:200]
        faults.append(Fault(time.monotonic() - t0, scenario, worker, kind, injected, detail))
    return faults


async def _sample_usage(server: Server, t0: float, stop: asyncio.Event, usage: list) -> None:
    while not stop.is_set():
        sample = server.usage(time.monotonic() - t0)
        if sample is not None:
            usage.append(sample)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def _settle(samples: list[dict], t0: float, timeout_s: float) -> float | None:
    """Seconds after the load until the deployment was idle with every slot
    on its own worker; None if it never was within timeout_s."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        s = samples[-1] if samples else None
        if s and s["t_s"] > start - t0 and not s["requests"] and all(s["home"]) and \
                all(s["serving"]) and all(v == "ready" for v in s["states"].values()):
            return time.monotonic() - start
        await asyncio.sleep(0.25)
    return None


async def _resources_back(server: Server, start, t0: float):
    """The resources idle at the end: sampled until back within the checks'
    slack of the start (builds abandoned during the run may hold a thread up
    to their deadline), or until RESOURCES_S passed."""
    deadline = time.monotonic() + RESOURCES_S
    while True:
        end = server.usage(time.monotonic() - t0)
        if end is None or start is None or checks.no_leaks(start, end)["ok"] \
                or time.monotonic() > deadline:
            return end
        await asyncio.sleep(1.0)


def references(model: str, dtype: str, records: list[RequestRecord]) -> dict:
    """The failure-free greedy tokens of every request sent, from the
    in-process engine, with the top choices at each position."""
    from kevlarflow import LLM, SamplingParams

    wanted = sorted({(tuple(r.prompt), r.max_tokens) for r in records})
    if not wanted:
        return {}
    print(f"computing the failure-free outputs of {len(wanted)} requests", flush=True)
    with LLM(model, load_progress=False, dtype=dtype) as llm:
        outs = llm.generate([list(p) for p, _ in wanted],
                            [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                            logprobs=TOP)
                             for _, n in wanted])
    return {key: (out.token_ids, [lp.top for lp in out.logprobs])
            for key, out in zip(wanted, outs)}


def _result(args, model, load, run, stopped, expected) -> dict:
    records = run["records"]
    samples = run["samples"]
    periods = checks.uncovered(samples, run["events"])
    result_checks = {
        "outputs": checks.outputs(records, expected, NEAR_TIE[args.dtype]),
        "failures": checks.failures(records, periods, args.outage_timeout),
        "no_503": checks.no_503(records, periods, args.outage_timeout),
        "recovered": checks.recovered(samples, run["faults"], run["events"],
                                      args.recovery_target),
        "end_state": checks.end_state(run["final"], run["health"]),
        "idle_pools": checks.idle_pools(run["final"]),
        "clean_stop": checks.clean_stop(stopped, 15.0),
        "no_leaks": checks.no_leaks(run["start_usage"], run["end_usage"]),
        "memory": checks.memory(run["usage"]),
    }
    config = dict(model=model, model_name=Path(model).name, instances=args.instances,
                  pp=args.pp, duration_s=args.duration, fault_every_s=args.fault_every,
                  kinds=args.kinds, clients=args.clients, think_s=args.think,
                  prompt_len=load.prompt_len, output_len=load.output_len, seed=args.seed,
                  hang_timeout_s=args.hang_timeout, outage_timeout_s=args.outage_timeout,
                  dtype=args.dtype,
                  serve_args=args.serve_arg,
                  recovery_target_s=args.recovery_target, cpu_count=os.cpu_count())
    result = dict(
        config=config, ok=all(c["ok"] for c in result_checks.values()), checks=result_checks,
        requests=dict(sent=len(records), completed=sum(r.ok for r in records),
                      failed=sum(not r.ok for r in records),
                      tokens=sum(len(r.token_ids) for r in records)),
        faults=[f.as_json() for f in run["faults"]], events=run["events"],
        samples=samples, settled_s=run["settled"], stats=run["stats"],
        usage=[dict(t_s=u.t_s, rss_mb=u.rss_mb, threads=u.threads, fds=u.fds)
               for u in run["usage"]],
        records=[r.as_json() for r in records], leftovers=run["leftovers"])
    result["summary"] = summary(result)
    return result
