"""Decode step time of the engine's model runner on a GPU, eager against CUDA
graphs, next to the floor that reading the weights sets.

One stage holds the whole model (--model, or the medium preset written to
/tmp once). Two runners share its weights: one with enforce_eager, one that
replays its decode steps from CUDA graphs. A step is what the engine runs
for a decode batch: the runner's forward from host token ids and block
tables to the logits, then a wait for them (the sampler reads them).
Sequences hold --context tokens on blocks of their own.

The floor is the time a step needs to read the weights once: the bytes of
every weight a decode step reads in full (all but the embedding table, of
which it gathers a row per token) divided by the bandwidth of a plain
device-to-device copy_ of a large buffer measured in the same run (bytes
read plus bytes written per second). KV reads come on top (their bytes per
step are printed); at small contexts the weights dominate.

The two runners take turns, `--turns` times, `--steps` steps a turn; every
figure is a median (min-max) over the turns of a per-turn value. Run by
bench/gpu/check.sh.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = Path("/tmp/kevlarflow-bench-medium-llama")


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"a Hugging Face checkpoint folder (default: the medium "
                                        f"preset, written to {DEFAULT_MODEL} if absent)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=256, help="tokens of each sequence")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="the runner's (default: the model's maximum, as the engine)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="decode steps a turn")
    parser.add_argument("--table", help="also write the final table to this file")
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.context < 1 or args.turns < 1 or args.steps < 1:
        parser.error("--batches, --context, --turns and --steps must be positive")
    return args


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_engine.py needs CUDA: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    from kevlarflow import _C
    if not _C.built_with_cuda:
        sys.exit("kevlarflow was built without CUDA kernels: build it against a CUDA torch "
                 "on a machine with nvcc (bench/gpu/check.sh does)")


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes read plus written per second by a device-to-device copy_."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rates = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        rates.append(2 * nbytes / (start.elapsed_time(end) / 1e3))
    del src, dst
    return statistics.median(rates)


def weight_bytes_read(stage) -> int:
    """Bytes of the weights a decode step reads in full."""
    return sum(p.numel() * p.element_size() for name, p in stage.named_parameters()
               if name != "embed_tokens")


def stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(s: tuple[float, float, float], digits: int = 2) -> str:
    return f"{s[0]:.{digits}f} ({s[1]:.{digits}f}-{s[2]:.{digits}f})"


def main(argv=None) -> int:
    args = parse(argv)
    require_cuda()
    from kevlarflow.engine.model_runner import ModelRunner
    from kevlarflow.model.config import ModelConfig
    from kevlarflow.model.loader import load_stage

    model = args.model
    if model is None:
        model = str(DEFAULT_MODEL)
        if not (DEFAULT_MODEL / "config.json").is_file():
            from kevlarflow.model.make_model import make_model
            print(f"writing the medium preset to {DEFAULT_MODEL} ...", file=sys.stderr)
            make_model(DEFAULT_MODEL, preset="medium")
    cfg = ModelConfig.from_pretrained(model)
    max_model_len = args.max_model_len or cfg.max_position_embeddings
    if args.context >= max_model_len:
        sys.exit(f"--context {args.context} must be below max_model_len {max_model_len}")
    stage = load_stage(model, cfg=cfg, progress=False, max_positions=max_model_len,
                       device="cuda")
    bs = args.block_size
    per_seq = args.context // bs + 1
    most = max(args.batches)
    num_blocks = 1 + most * per_seq  # block 0 is left to the graphs' padding rows
    runners = {}
    for name, eager in (("eager", True), ("graphs", False)):
        start = time.perf_counter()
        runners[name] = ModelRunner(stage, num_blocks, bs, device="cuda", max_num_seqs=most,
                                    max_model_len=max_model_len, enforce_eager=eager)
        print(f"{name} runner ready in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    graphs = runners["graphs"].decode_graphs
    bandwidth = copy_bandwidth()
    weights = weight_bytes_read(stage)
    floor_s = weights / bandwidth
    kv_per_token = cfg.kv_bytes_per_token

    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for batch in args.batches:
        chunks = [(1, args.context, list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)))
                  for i in range(batch)]
        ids = torch.randint(16, cfg.vocab_size, (batch,), generator=gen)
        rows = torch.arange(batch)

        def step(runner):
            runner.forward(ids, chunks, rows)
            torch.cuda.current_stream().synchronize()  # the sampler waits for the logits

        for runner in runners.values():  # warm-up
            for _ in range(3):
                step(runner)
        replays = graphs.replays
        samples = {name: [] for name in runners}
        for turn in range(args.turns):
            order = list(runners) if turn % 2 == 0 else list(reversed(runners))
            for name in order:
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(runners[name])
                samples[name].append((time.perf_counter() - start) / args.steps)
        if graphs.replays - replays != args.turns * args.steps:
            sys.exit(f"batch {batch}: the graph runner replayed {graphs.replays - replays} of "
                     f"{args.turns * args.steps} steps")
        eager, graph = samples["eager"], samples["graphs"]
        rows_out.append((batch, stats([s * 1e3 for s in eager]), stats([s * 1e3 for s in graph]),
                         stats([e / g for e, g in zip(eager, graph)]),
                         stats([e / floor_s for e in eager]), stats([g / floor_s for g in graph]),
                         batch * (args.context + 1) * kv_per_token))

    gb = 1e9
    lines = [
        f"decode step, {Path(model).name} ({cfg.dtype}, {cfg.num_layers} layers, one stage), "
        f"context {args.context}, max_model_len {max_model_len}, block size {bs}; "
        f"{args.turns} turns of {args.steps} steps",
        f"weights read per step {weights / gb:.3f} GB (all but the embedding); device-to-device "
        f"copy {bandwidth / gb:.0f} GB/s (read + written); weight-read floor "
        f"{floor_s * 1e3:.3f} ms; graphs captured for {graphs.sizes} in {graphs.capture_s:.2f} s",
        "",
        f"{'batch':>5} | {'eager ms':>22} | {'graphs ms':>22} | {'eager / graphs':>19} | "
        f"{'eager / floor':>19} | {'graphs / floor':>19} | {'KV read GB':>10}",
    ]
    for batch, e, g, speedup, ef, gf, kv in rows_out:
        lines.append(f"{batch:>5} | {fmt(e, 3):>22} | {fmt(g, 3):>22} | {fmt(speedup):>19} | "
                     f"{fmt(ef):>19} | {fmt(gf):>19} | {kv / gb:>10.3f}")
    table = "\n".join(lines)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
