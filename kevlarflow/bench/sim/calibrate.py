"""Measure this machine's costs, for `--costs local`: each figure comes from
running the piece of KevlarFlow that pays it, the way a worker runs it.

- process_start_s: a fresh Python importing the worker module;
- weight load: load_stage of one stage of the cached checkpoint (the second
  load, as a restart on this machine finds the files in the page cache), and
  worker_init_s: allocating that worker's KV pool;
- comm_build_s and link bytes/s: two processes build a pipeline group with
  kevlarflow's CommManager (gloo over TCP), then one sends 64 MB to the other;
- step costs: that stage's forward pass on one CPU thread, on prefill chunks
  and decode batches of a few sizes, fitted to base + per-token costs.

The deployment is the real failover benchmark's: 2 instances x 2 stages,
max_num_batched_tokens 256, the engine's max_num_seqs, replication every
0.5 s, a hang timeout of 1 s."""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time

from kevlarflow.bench.sim.costs import Costs, local_costs_path, save_file

STAGES, INSTANCES, BUDGET = 2, 2, 256
KV_POOL_BYTES = 256 << 20      # the failover benchmark's per-worker pool
SEND_BYTES = 64 << 20
PREFILL_SIZES = (16, 64, 128, 256)
DECODE_BATCHES = (1, 8, 32, 64)
MIXED = ((64, 16), (128, 32))  # (prefill, decode) in one step: the fit must tell them apart
DECODE_CONTEXT = 128           # tokens each decoding sequence has already
REPEATS = 3                    # of the builds and process starts
STEP_REPEATS = 7               # of each step: the median of these is one sample
MAX_REL_SE = 0.25              # a fitted cost less certain than this is flagged
MAX_REL_RESIDUAL = 0.2         # so is a sample the fit misses by more than this


def _median_time(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def process_start_s() -> float:
    cmd = [sys.executable, "-c", "import kevlarflow.deploy.worker"]
    return _median_time(lambda: subprocess.run(cmd, check=True))


def _comm_member(me: str, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    from kevlarflow.comm.manager import CommManager

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    mgr = CommManager(store, me, deadline_s=30.0)
    members = ["a", "b"]
    builds = []
    for generation in range(REPEATS):
        store.add(f"go/{generation}", 1)
        store.wait([f"start/{generation}"])
        start = time.perf_counter()
        mgr.build("g", members, generation=generation)
        builds.append(time.perf_counter() - start)
    payload = torch.ones(SEND_BYTES // 4)
    start = time.perf_counter()
    for _ in range(2):
        if me == "a":
            mgr.send("g", payload, "b")
        else:
            mgr.recv("g", payload, "a")
    if me == "b":
        results.put((statistics.median(builds), 2 * SEND_BYTES / (time.perf_counter() - start)))
    mgr.close()


def comm_costs() -> tuple[float, float]:
    """(seconds to build a 2-member group, bytes/s of one send)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_comm_member, args=(me, store.port, results)) for me in "ab"]
    for p in procs:
        p.start()
    try:
        for generation in range(REPEATS):  # both members start each build together
            while store.add(f"go/{generation}", 0) < 2:
                time.sleep(0.01)
            store.set(f"start/{generation}", "1")
        build_s, bandwidth = results.get(timeout=120)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return build_s, bandwidth


def stage_costs(model: str) -> dict:
    """Weight load, KV pool and forward-step costs of the middle stage."""
    import numpy as np
    import torch

    from kevlarflow.engine.model_runner import allocate_kv_cache, attention_metadata
    from kevlarflow.model.config import ModelConfig
    from kevlarflow.model.loader import load_stage
    from kevlarflow.model.stage import StageSpec

    torch.set_num_threads(1)
    cfg = ModelConfig.from_pretrained(model)
    spec = StageSpec.split(cfg.num_layers, STAGES, STAGES - 1)
    load_stage(model, spec, cfg, progress=False)  # the first read fills the page cache
    start = time.perf_counter()
    stage = load_stage(model, spec, cfg, progress=False)
    load_s = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in stage.parameters())
    stage_layers = spec.end_layer - spec.first_layer
    kv_per_token = cfg.kv_bytes_per_token * stage_layers // cfg.num_layers
    block_size = 16
    num_blocks = KV_POOL_BYTES // (block_size * kv_per_token)
    start = time.perf_counter()
    kv = allocate_kv_cache(stage, num_blocks, block_size)
    init_s = time.perf_counter() - start
    hidden = lambda n: torch.randn(n, cfg.hidden_size, dtype=stage.cfg.dtype)  # noqa: E731

    def forward(chunks):
        meta = attention_metadata(chunks, block_size)
        x = hidden(sum(n for n, _, _ in chunks))
        return _median_time(lambda: stage(x, meta, kv, logits_indices=torch.tensor([0])),
                            STEP_REPEATS)

    def step(prefill: int, decode: int) -> float:
        # One prefill chunk of its own blocks, then `decode` sequences of
        # DECODE_CONTEXT tokens each, each on blocks of its own.
        n = DECODE_CONTEXT // block_size + 1
        chunks = [(prefill, 0, list(range(prefill // block_size + 1)))] if prefill else []
        first = prefill // block_size + 1
        chunks += [(1, DECODE_CONTEXT, list(range(first + i * n, first + (i + 1) * n)))
                   for i in range(decode)]
        return forward(chunks)

    design = [(n, 0) for n in PREFILL_SIZES] + [(0, b) for b in DECODE_BATCHES] + list(MIXED)
    step(16, 1)  # warm-up: first calls pay for allocation
    times = [step(p, d) for p, d in design]
    fit = fit_step_costs(np.array([(1.0, p, d) for p, d in design]), np.array(times))
    points = [dict(prefill=p, decode=d, seconds=t) for (p, d), t in zip(design, times)]
    return dict(load_s=load_s, weight_bytes=weight_bytes, init_s=init_s,
                kv_bytes_per_token=kv_per_token,
                activation_bytes=cfg.hidden_size * torch.empty((), dtype=stage.cfg.dtype).element_size(),
                points=points, **fit)


def fit_step_costs(rows, times) -> dict:
    """base + prefill tokens x a + decode tokens x b, fitted to the steps'
    times by least squares on relative errors (a 5 ms step counts as much as
    a 500 ms one), with the standard error of each cost and the worst
    residual; "doubts" says what the fit cannot tell on this machine."""
    import numpy as np

    weights = 1.0 / times
    a, w = rows * weights[:, None], times * weights
    coef, *_ = np.linalg.lstsq(a, w, rcond=None)
    residuals = (rows @ coef - times) / times
    dof = max(1, len(times) - len(coef))
    cov = np.linalg.pinv(a.T @ a) * float(residuals @ residuals) / dof
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    names = ("base", "prefill", "decode")
    doubts = [f"the {name} cost ({value * 1e3:.3f} ms +- {err * 1e3:.3f})"
              for name, value, err in zip(names, coef, se)
              if name != "base" and (value <= 0 or err > MAX_REL_SE * value)]
    worst = float(np.max(np.abs(residuals)))
    if worst > MAX_REL_RESIDUAL:
        doubts.append(f"a step the fit misses by {worst:.0%}")
    return dict(**{n: max(0.0, float(v)) for n, v in zip(names, coef)},
                stderr={n: float(e) for n, e in zip(names, se)}, worst_residual=worst,
                doubts=doubts)


def calibrate(preset: str, out: str | None = None) -> Costs:
    from kevlarflow.bench.throughput import ensure_model
    from kevlarflow.engine.llm_engine import EngineConfig

    model = ensure_model(preset, "llama")
    print(f"calibrating on {platform.node()} with the {preset} checkpoint at {model} ...", flush=True)
    start_s = process_start_s()
    print(f"  process start {start_s:.2f} s", flush=True)
    stage = stage_costs(model)
    print(f"  stage {STAGES - 1} of {STAGES}: {stage['weight_bytes'] / 1e6:.0f} MB of weights "
          f"loaded in {stage['load_s']:.2f} s, KV pool {stage['init_s']:.3f} s", flush=True)
    for p in stage["points"]:
        print(f"    step with {p['prefill']:.0f} prefill + {p['decode']:.0f} decode tokens: "
              f"{p['seconds'] * 1e3:.1f} ms", flush=True)
    se = stage["stderr"]
    print(f"  fit: {stage['base'] * 1e3:.2f} ms (+- {se['base'] * 1e3:.2f}) + "
          f"{stage['prefill'] * 1e3:.3f} ms (+- {se['prefill'] * 1e3:.3f}) per prefill token + "
          f"{stage['decode'] * 1e3:.3f} ms (+- {se['decode'] * 1e3:.3f}) per decode token; "
          f"worst residual {stage['worst_residual']:.0%}", flush=True)
    if stage["doubts"]:
        print("  WARNING: the step costs are uncertain on this machine: "
              + "; ".join(stage["doubts"]) + ". Calibrate again on an idle machine; the "
              "simulator's step figures follow from these costs.", flush=True)
    build_s, link = comm_costs()
    print(f"  communicator build {build_s * 1e3:.0f} ms, send {link / 1e9:.2f} GB/s", flush=True)
    costs = Costs(
        instances=INSTANCES, stages=STAGES, max_num_batched_tokens=BUDGET,
        max_num_seqs=EngineConfig.max_num_seqs,
        process_start_s=start_s, worker_init_s=stage["init_s"],
        weight_bytes_per_stage=float(stage["weight_bytes"]),
        weight_load_bytes_per_s=stage["weight_bytes"] / stage["load_s"],
        comm_build_s=build_s, detect_kill_s=0.1, detect_hang_s=1.0,
        link_bytes_per_s=link, activation_bytes_per_token=float(stage["activation_bytes"]),
        kv_bytes_per_token_per_stage=float(stage["kv_bytes_per_token"]),
        replication_interval_s=0.5,
        step_base_s=stage["base"], step_prefill_token_s=stage["prefill"],
        step_decode_token_s=stage["decode"], cpu_cores=float(os.cpu_count() or 1))
    note = (f"measured by `kevlarflow bench simulate --calibrate --preset {preset}` on "
            f"{platform.node()} ({platform.processor() or platform.machine()}), "
            f"{time.strftime('%Y-%m-%d %H:%M')}"
            + (f"; uncertain: {'; '.join(stage['doubts'])}" if stage["doubts"] else ""))
    for path in [local_costs_path()] + ([out] if out else []):
        save_file(costs, path, note)
        print(f"wrote {path}")
    print(f"  fitted step: {costs.step_base_s * 1e3:.2f} ms + {costs.step_prefill_token_s * 1e3:.3f} ms"
          f" per prefill token + {costs.step_decode_token_s * 1e3:.3f} ms per decode token")
    return costs
